"""The ops of a decode step's decoder layer that have fused twins: a registry of `DecodeOps`.

A decoder layer of `PagedLlama.decode` is, in these ops (no biases):
  q = rope_write_kv(norm_linear(h, input_norm, eps, qkv), cos, sin, ...)   # rotates q and k, stores k and v
  h = plus_linear(h, attention(q), o)
  h = silu_mul_plus_linear(h, norm_linear(h, post_norm, eps, gate_up), down)
and the logits are ``norm_linear(h, final_norm, eps, lm_head)``.

Implementations (`DECODE_OPS`, name -> factory of the backend's `write_kv`):
- "torch": the PyTorch formulas the model has always run (F.rms_norm, F.linear, addmm with the residual, the
  five-op RoPE then `write_kv`, F.silu times up). The reference twin; any device.
- "triton_cublas": RoPE of q and k with the KV store in one Triton launch (`triton_fused_rope_kv`) and
  ``silu(gate) * up`` in one (`triton_fused_silu_mul`); the products stay cuBLAS's. CUDA.
- "triton": as "triton_cublas", and for ONE token (batch-1 decode) the products are Triton matrix-vector
  kernels with the RMSNorm, or the SiLU-multiply, and the residual add fused in (`triton_fused_gemv`): a layer
  is 5 launches plus attention's (7 kernels; about 20 with "torch", counting cuBLAS's split-K reductions: 240
  kernels a Llama-3-8B step against 658 on an H200). Batches above one token take "triton_cublas"'s ops. CUDA.
Numbers: RoPE and the SiLU-multiply round as the formulas do (within one rounding: FMA contraction); a fused norm is applied to the
float32 product, so "triton" is within one bf16 rounding of "torch" there (tests compare the twins on CUDA, and
the kernels under TRITON_INTERPRET=1 on the CPU). Triton modules are imported only by their factories, so this
module imports without triton. An unknown name raises ValueError listing the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import WriteKV, triton_available


@dataclass(frozen=True)
class DecodeOps:
    """One implementation of the fusable ops of a decoder layer (module docstring); immutable."""

    name: str
    norm_linear: Callable[[Tensor, Tensor, float, Tensor], Tensor]  # (x, norm weight, eps, weight) -> y
    plus_linear: Callable[[Tensor, Tensor, Tensor], Tensor]  # (h, x, weight) -> h + x @ weight.T
    silu_mul_plus_linear: Callable[[Tensor, Tensor, Tensor], Tensor]  # (h, gate_up, weight) -> h + silu*up @ w.T
    rope_write_kv: Callable[..., Tensor]  # (qkv, cos, sin, heads, kv_heads, key_cache, value_cache, slots) -> q


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' RMSNorm as one op (see `PagedLlama`'s `_rms_norm`)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE of x (tokens, heads, head_dim) with cos/sin (tokens, head_dim) in x's dtype."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _norm_linear_torch(x: Tensor, norm: Tensor, eps: float, weight: Tensor) -> Tensor:
    return F.linear(rms_norm(x, norm, eps), weight)


def _plus_linear_torch(h: Tensor, x: Tensor, weight: Tensor) -> Tensor:
    return torch.addmm(h, x, weight.t())


def _silu_mul_plus_linear_torch(h: Tensor, gate_up: Tensor, weight: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.addmm(h, F.silu(gate) * up, weight.t())


def _torch_ops(write_kv: WriteKV) -> DecodeOps:
    def rope_write_kv(qkv: Tensor, cos: Tensor, sin: Tensor, heads: int, kv_heads: int, key_cache: Tensor,
                      value_cache: Tensor, slots: Tensor) -> Tensor:
        t, dim = qkv.shape[0], key_cache.shape[-1]
        rot = heads + kv_heads  # q and k heads are adjacent: one RoPE for both
        qk = rotate(qkv[:, : rot * dim].view(t, rot, dim), cos, sin)
        write_kv(qk[:, heads:], qkv[:, rot * dim :].view(t, kv_heads, dim), key_cache, value_cache, slots)
        return qk[:, :heads]

    return DecodeOps("torch", _norm_linear_torch, _plus_linear_torch, _silu_mul_plus_linear_torch, rope_write_kv)


def _triton_cublas_ops(write_kv: WriteKV) -> DecodeOps:
    if not triton_available():
        raise RuntimeError("the 'triton' decode ops need the triton package and CUDA")
    from .triton_fused_rope_kv import triton_rope_write_kv
    from .triton_fused_silu_mul import triton_silu_mul

    def silu_mul_plus_linear(h: Tensor, gate_up: Tensor, weight: Tensor) -> Tensor:
        return torch.addmm(h, triton_silu_mul(gate_up), weight.t())

    return DecodeOps("triton_cublas", _norm_linear_torch, _plus_linear_torch, silu_mul_plus_linear,
                     triton_rope_write_kv)


def _triton_ops(write_kv: WriteKV) -> DecodeOps:
    base = _triton_cublas_ops(write_kv)
    from .triton_fused_gemv import Prologue, triton_gemv

    def norm_linear(x: Tensor, norm: Tensor, eps: float, weight: Tensor) -> Tensor:
        if x.shape[0] != 1:
            return base.norm_linear(x, norm, eps, weight)
        return triton_gemv(x, weight, Prologue.RMS_NORM, norm_weight=norm, eps=eps)

    def plus_linear(h: Tensor, x: Tensor, weight: Tensor) -> Tensor:
        if x.shape[0] != 1:
            return base.plus_linear(h, x, weight)
        return triton_gemv(x.contiguous(), weight, Prologue.NONE, residual=h)

    def silu_mul_plus_linear(h: Tensor, gate_up: Tensor, weight: Tensor) -> Tensor:
        if gate_up.shape[0] != 1:
            return base.silu_mul_plus_linear(h, gate_up, weight)
        return triton_gemv(gate_up, weight, Prologue.SILU_MUL, residual=h)

    return DecodeOps("triton", norm_linear, plus_linear, silu_mul_plus_linear, base.rope_write_kv)


DECODE_OPS: dict[str, Callable[[WriteKV], DecodeOps]] = {
    "torch": _torch_ops,
    "triton_cublas": _triton_cublas_ops,
    "triton": _triton_ops,
}


def get_decode_ops(name: str, write_kv: WriteKV) -> DecodeOps:
    """The decode ops registered under `name`, storing KV with `write_kv` where they do not fuse the store."""
    factory = DECODE_OPS.get(str(name).lower())
    if factory is None:
        raise ValueError(f"unknown decode ops {name!r}; expected one of: {', '.join(sorted(DECODE_OPS))}")
    return factory(write_kv)


def select_decode_ops(device: torch.device | str, write_kv: WriteKV) -> DecodeOps:
    """The fastest ops for `device`: "triton" on CUDA when triton is importable, else "torch"."""
    if torch.device(device).type == "cuda" and triton_available():
        return get_decode_ops("triton", write_kv)
    return get_decode_ops("torch", write_kv)
