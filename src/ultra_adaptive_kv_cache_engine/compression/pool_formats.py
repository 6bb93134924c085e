"""Pool formats: how ONE layer's keys (or values) of ONE pool block are stored as a quantized byte "slab".

A quantized pool is uint8 of shape (num_blocks, num_layers, 2, slab_bytes); the slab of layer l, K (0) or V (1),
of block b is ``pool[b, l, kv]``. For an fp tensor x of shape (block_size, kv_heads, head_dim) = (bs, H, D):
- "fp8": data = (x / s) as float8_e4m3fn, s = amax over D / 448 per (token, head), shape (bs, H);
- "int8": q = round(x / s) clamped to [-127, 127], s = amax over D / 127 per (token, head);
- "int4" / "int2" (KIVI): asymmetric unsigned levels 0..15 / 0..3, q = round((x - mn) / s) clamped, with
  s = (max - mn) / levels. KEYS per channel (mn, s per (head, channel) over the bs tokens, shape (H, D)),
  VALUES per token (per (token, head) over D, shape (bs, H)). Packed along D, low bits first: two per byte
  (int4: byte[i] = q[2i] | q[2i+1] << 4) or four per byte (int2: q[4i] | q[4i+1] << 2 | ... << 6).
Slab bytes, in C order without gaps: the data, then float16 parameters (fp8/int8: scales (bs, H); int4/int2
keys: scales (H, D) then mins (H, D); values: scales (bs, H) then mins (bs, H)); zero padding up to
`slab_bytes` (a multiple of 16, the same for K and V: the larger of the two).

All quantisation math is float32. A scale is cast to float16 before use and quantisation divides by that
rounded scale, so quantise and dequantise use the same number; a scale that is 0 (all values equal, or below
float16's range) is stored as 1 (dequantisation then returns mn exactly); scales are capped at float16's max.
Mins are taken in float32 and stored as float16. Dequantisation: fp8 data * s, int8 q * s, int4/int2
q * s + mn, cast to the compute dtype. Error bound per element: int8 s / 2; int4/int2 s / 2 plus the float16
rounding of mn; fp8 one e4m3 rounding step (a relative 2^-4) of x / s, times s.

This module is the reference quantiser (pure PyTorch, CPU and CUDA) that the Triton kernels are compared to.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

SLAB_ALIGN = 16
_FP16_MAX = 65504.0
_FP8_MAX = 448.0


def _fp16_scale(s: Tensor) -> Tensor:
    """`s` (float32) as the float16 scale actually stored: capped at float16's max, zeros (and values that
    round to zero) replaced by 1."""
    s16 = s.clamp(max=_FP16_MAX).to(torch.float16)
    return torch.where(s16 > 0, s16, torch.ones_like(s16))


def _require_shape_ints(**sizes: object) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


@dataclass(frozen=True)
class PoolFormat(ABC):
    """One quantized storage format of pool blocks (see the module docstring); immutable and stateless."""

    name: str
    bits: int
    key_per_channel: bool
    #: The default residual window (`KVCacheConfig.kv_residual_tokens` none): recent tokens a sequence keeps
    #: reading in full precision (see `residual_window`).
    residual_tokens: int = 128

    # -- sizes ----------------------------------------------------------------------------------------------
    def check_shape(self, block_size: int, num_kv_heads: int, head_dim: int) -> None:
        """ValueError unless the sizes are positive ints and head_dim packs into whole bytes."""
        _require_shape_ints(block_size=block_size, num_kv_heads=num_kv_heads, head_dim=head_dim)
        per_byte = 8 // self.bits
        if head_dim % max(per_byte, 2):
            raise ValueError(f"head_dim={head_dim} must be a multiple of {max(per_byte, 2)} for pool format {self.name!r}")

    def data_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of the quantized data of one slab."""
        return block_size * num_kv_heads * head_dim * self.bits // 8

    @abstractmethod
    def param_count(self, block_size: int, num_kv_heads: int, head_dim: int, is_key: bool) -> int:
        """float16 parameters (scales, then mins) of one slab of keys or values."""

    def slab_bytes(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one slab (K or V of one layer of one block), rounded up to a multiple of 16."""
        self.check_shape(block_size, num_kv_heads, head_dim)
        params = max(self.param_count(block_size, num_kv_heads, head_dim, key)
                     for key in (True, False))
        raw = self.data_bytes(block_size, num_kv_heads, head_dim) + 2 * params
        return -(-raw // SLAB_ALIGN) * SLAB_ALIGN

    # -- conversion -----------------------------------------------------------------------------------------
    def quantize(self, x: Tensor, is_key: bool) -> Tensor:
        """Slabs (n, slab_bytes) uint8 of x (n, bs, H, D) float, on x's device."""
        if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"pool format {self.name!r} quantizes a float tensor (n, block_size, heads, head_dim); got {got}")
        n, bs, heads, dim = (int(d) for d in x.shape)
        slab = self.slab_bytes(bs, heads, dim)
        data, params = self._encode(x.float(), bool(is_key))
        parts = [data.reshape(n, -1), params.reshape(n, -1).view(torch.uint8)]
        used = parts[0].shape[1] + parts[1].shape[1]
        if used < slab:
            parts.append(torch.zeros((n, slab - used), dtype=torch.uint8, device=x.device))
        return torch.cat(parts, dim=1)

    def dequantize(self, slabs: Tensor, is_key: bool, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> Tensor:
        """The fp tensor (n, bs, H, D) of `dtype` that slabs (n, slab_bytes) uint8 hold."""
        slab = self.slab_bytes(block_size, num_kv_heads, head_dim)
        if not isinstance(slabs, Tensor) or slabs.dtype != torch.uint8 or slabs.dim() != 2 or slabs.shape[1] != slab:
            got = f"{slabs.dtype} {tuple(slabs.shape)}" if isinstance(slabs, Tensor) else type(slabs).__name__
            raise ValueError(f"pool format {self.name!r} dequantizes uint8 slabs (n, {slab}); got {got}")
        n = int(slabs.shape[0])
        nbytes = self.data_bytes(block_size, num_kv_heads, head_dim)
        count = self.param_count(block_size, num_kv_heads, head_dim, bool(is_key))
        data = slabs[:, :nbytes].reshape(n, block_size, num_kv_heads, -1)
        # a copy, not .contiguous(): a slice that is already contiguous (one slab, or a slab inside a larger
        # buffer) may start at an odd byte, and uint8 at an odd storage offset cannot be viewed as float16
        params = slabs[:, nbytes : nbytes + 2 * count].clone().view(torch.float16).float()
        return self._decode(data, params, bool(is_key), head_dim).to(dtype)

    @abstractmethod
    def _encode(self, x: Tensor, is_key: bool) -> tuple[Tensor, Tensor]:
        """(data uint8 (n, bs, H, D * bits / 8), float16 params (n, ...)) of float32 x (n, bs, H, D)."""

    @abstractmethod
    def _decode(self, data: Tensor, params: Tensor, is_key: bool, head_dim: int) -> Tensor:
        """float32 (n, bs, H, D) from data uint8 (n, bs, H, D * bits / 8) and float32 params (n, count)."""


@dataclass(frozen=True)
class SymmetricFormat(PoolFormat):
    """fp8 / int8: one absmax scale per (token, head), for keys and values alike."""

    qmax: float = 127.0
    storage: torch.dtype = torch.int8

    def param_count(self, block_size: int, num_kv_heads: int, head_dim: int, is_key: bool) -> int:
        return block_size * num_kv_heads

    def _encode(self, x: Tensor, is_key: bool) -> tuple[Tensor, Tensor]:
        s16 = _fp16_scale(x.abs().amax(dim=-1) / self.qmax)
        y = (x / s16.float()[..., None]).clamp(-self.qmax, self.qmax)
        if not self.storage.is_floating_point:
            y = torch.round(y)
        return y.to(self.storage).view(torch.uint8), s16

    def _decode(self, data: Tensor, params: Tensor, is_key: bool, head_dim: int) -> Tensor:
        n, bs, heads, _ = data.shape
        values = data.contiguous().view(self.storage).float()
        return values * params.view(n, bs, heads)[..., None]


@dataclass(frozen=True)
class AffineFormat(PoolFormat):
    """int4 / int2 (KIVI): min and scale per channel for keys, per token for values; packed along head_dim."""

    def param_count(self, block_size: int, num_kv_heads: int, head_dim: int, is_key: bool) -> int:
        return 2 * (num_kv_heads * head_dim if is_key else block_size * num_kv_heads)

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def _encode(self, x: Tensor, is_key: bool) -> tuple[Tensor, Tensor]:
        dim = 1 if is_key else -1  # keys: over the block's tokens; values: over head_dim
        mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        s16 = _fp16_scale((mx - mn) / self.levels)
        q = torch.round((x - mn) / s16.float()).clamp_(0, self.levels).to(torch.uint8)
        n = x.shape[0]
        params = torch.cat([s16.reshape(n, -1), mn.to(torch.float16).reshape(n, -1)], dim=1)
        return self._pack(q), params

    def _decode(self, data: Tensor, params: Tensor, is_key: bool, head_dim: int) -> Tensor:
        n, bs, heads, _ = data.shape
        q = self._unpack(data, head_dim).float()
        scale, mn = params.chunk(2, dim=1)
        shape = (n, 1, heads, head_dim) if is_key else (n, bs, heads, 1)
        return q * scale.reshape(shape) + mn.reshape(shape)

    def _pack(self, q: Tensor) -> Tensor:
        per = 8 // self.bits
        q = q.view(*q.shape[:-1], q.shape[-1] // per, per)
        out = q[..., 0].clone()
        for j in range(1, per):
            out |= q[..., j] << (self.bits * j)
        return out

    def _unpack(self, data: Tensor, head_dim: int) -> Tensor:
        per, mask = 8 // self.bits, self.levels
        parts = [(data >> (self.bits * j)) & mask for j in range(per)]
        return torch.stack(parts, dim=-1).reshape(*data.shape[:-1], head_dim)


POOL_FORMATS: dict[str, PoolFormat] = {
    "fp8": SymmetricFormat("fp8", 8, False, qmax=_FP8_MAX, storage=torch.float8_e4m3fn),
    "int8": SymmetricFormat("int8", 8, False, qmax=127.0, storage=torch.int8),
    "int4": AffineFormat("int4", 4, True),
    "int2": AffineFormat("int2", 2, True, residual_tokens=256),
}


def residual_window(name: str, configured: int | None) -> int:
    """The residual window of pool format `name`: `configured` (`KVCacheConfig.kv_residual_tokens`) when set,
    else the format's own `residual_tokens`: 128 tokens (KIVI's value), 256 for int2, whose perplexity on
    bench_kv_quality's Bible windows rose 11.74% over full precision with 128 and 8.83% with 256 (the quality
    goal is +10%; the README's "Quantized KV" gives the figures)."""
    return get_pool_format(name).residual_tokens if configured is None else configured


def get_pool_format(name: object) -> PoolFormat:
    """The format registered under `name`; ValueError listing the valid names otherwise."""
    fmt = POOL_FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"unknown pool format {name!r}; expected one of: {', '.join(POOL_FORMATS)}")
    return fmt
