"""Reading quantized pool slabs inside the Triton attention kernels: codes unpacked and dequantised in registers.

A slab is one layer's keys (or values) of one block in a `PoolFormat` (see `compression.pool_formats`): the
codes first, (block_size, kv_heads, head_dim // PACK) bytes in C order, then the float16 parameters (per
token and head: scales, and for int4/int2 values mins, each (block_size, kv_heads); per channel for int4/int2
keys: scales then mins, each (kv_heads, head_dim)). `quant_tile` returns one tile of keys or values of one KV
head, (BLOCK_N, BLOCK_D) float32, rows selected by their block ids and slots, so any tile may span several
blocks; rows that are not slabs (staging blocks, or past the end) come back as zeros, to be merged with the
staging rows by the caller.

Format codes (`FORMAT_CODES`, a constexpr of the kernels): 0 fp8 e4m3 (bytes bitcast to float8e4nv), 1 int8,
2 int4 (two codes per byte, low nibble first), 3 int2 (four per byte, lowest bits first). Packed codes are
loaded as bytes along head_dim (vector loads) and spread with `tl.join` + `tl.reshape`, which keeps C order.
Parameters are read as float16 through a cast pointer when their offset is even (`SlabArgs.aligned`), else byte
by byte (odd code sizes only happen in tiny test shapes).

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import triton
import triton.language as tl
from torch import Tensor

if TYPE_CHECKING:
    from .paged_kv import PagedKV

#: Pool format name -> (format code, codes per byte); the kernels' constexpr FMT and PACK.
FORMAT_CODES: dict[str, tuple[int, int]] = {"fp8": (0, 1), "int8": (1, 1), "int4": (2, 2), "int2": (3, 4)}


def format_code(name: str) -> tuple[int, int]:
    """(FMT, PACK) of the pool format `name`; ValueError naming the valid ones."""
    code = FORMAT_CODES.get(name)
    if code is None:
        raise ValueError(f"pool format {name!r} has no Triton kernel; expected one of: {', '.join(FORMAT_CODES)}")
    return code


@dataclass(frozen=True)
class SlabArgs:
    """What an attention launch passes for the slabs of a `PagedKV`: the key and value slab views (stand-ins
    never read when the view is not quantized), their count and the kernels' constexprs."""

    keys: Tensor
    values: Tensor
    num_slabs: int
    quant: bool
    fmt: int
    pack: int
    heads: int
    aligned: bool

    @classmethod
    def of(cls, kv: PagedKV) -> SlabArgs:
        quant = kv.quant
        if quant is None:
            return cls(kv.key_cache, kv.value_cache, 0, False, 0, 1, kv.num_kv_heads, True)
        fmt, pack = format_code(quant.format.name)
        keys, values = quant.key_slabs, quant.value_slabs
        even = all(t.stride(0) % 2 == 0 and t.data_ptr() % 2 == 0 for t in (keys, values))
        aligned = even and (kv.block_size * kv.num_kv_heads * (kv.head_dim // pack)) % 2 == 0
        return cls(keys, values, quant.num_blocks, True, fmt, pack, kv.num_kv_heads, aligned)

    def constexprs(self) -> dict[str, Any]:
        return {"QUANT": self.quant, "FMT": self.fmt, "PACK": self.pack, "HEADS": self.heads, "ALIGNED": self.aligned}


@triton.jit
def load_f16(base, idx, mask, ALIGNED: tl.constexpr):
    """float16 values (as float32) at element `idx` of float16 arrays starting at byte pointers `base`;
    0 where masked. ALIGNED: `base` is even, so a float16 pointer may read them directly."""
    if ALIGNED:
        x = tl.load(base.to(tl.pointer_type(tl.float16)) + idx, mask=mask, other=0.0)
    else:
        lo = tl.load(base + 2 * idx, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(base + 2 * idx + 1, mask=mask, other=0).to(tl.uint16)
        x = (lo | (hi << 8)).to(tl.float16, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def store_f16(base, idx, x, mask, ALIGNED: tl.constexpr):
    """Store float32 `x` rounded to float16 at element `idx` of float16 arrays starting at byte pointers `base`."""
    h = x.to(tl.float16)
    if ALIGNED:
        tl.store(base.to(tl.pointer_type(tl.float16)) + idx, h, mask=mask)
    else:
        bits = h.to(tl.uint16, bitcast=True)
        tl.store(base + 2 * idx, (bits & 0xFF).to(tl.uint8), mask=mask)
        tl.store(base + 2 * idx + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def unpack_codes(raw, PACK: tl.constexpr):
    """Bytes (rows, cols) -> unsigned codes (rows, cols * PACK) in C order: code i of a byte sits in bits
    i * 8 / PACK and up (PACK 2: nibbles, PACK 4: 2-bit codes)."""
    rows: tl.constexpr = raw.shape[0]
    cols: tl.constexpr = raw.shape[1]
    if PACK == 2:
        codes = tl.reshape(tl.join(raw & 0xF, raw >> 4), [rows, cols * 2])
    else:
        even = tl.join(raw & 0x3, (raw >> 4) & 0x3)  # codes 4i and 4i + 2
        odd = tl.join((raw >> 2) & 0x3, raw >> 6)  # codes 4i + 1 and 4i + 3
        codes = tl.reshape(tl.join(even, odd), [rows, cols * 4])
    return codes


@triton.jit
def quant_tile(
    slab_ptr, stride_slab, page, slot, ok, kvh,
    IS_KEY: tl.constexpr, FMT: tl.constexpr, PACK: tl.constexpr,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Dequantised (BLOCK_N, BLOCK_D) float32 tile of KV head `kvh`: row i is token `slot[i]` of slab
    `page[i]` where `ok[i]`, zeros elsewhere (and in the columns past head_dim)."""
    DP: tl.constexpr = HEAD_DIM // PACK
    DATA: tl.constexpr = PAGE * HEADS * DP  # bytes of codes; the float16 parameters follow
    row = slab_ptr + page * stride_slab
    dp = tl.arange(0, BLOCK_D // PACK)
    mask = ok[:, None] & (dp < DP)[None, :]
    raw = tl.load((row + (slot * HEADS + kvh) * DP)[:, None] + dp[None, :], mask=mask, other=0)
    tok = slot * HEADS + kvh  # index of the token's per-token parameters
    if FMT == 0:
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32) * load_f16(row + DATA, tok, ok, ALIGNED)[:, None]
    elif FMT == 1:
        x = raw.to(tl.int8, bitcast=True).to(tl.float32) * load_f16(row + DATA, tok, ok, ALIGNED)[:, None]
    else:
        codes = unpack_codes(raw, PACK).to(tl.float32)
        if IS_KEY:  # per channel: (HEADS, HEAD_DIM) scales then mins, shared by the block's tokens
            d = tl.arange(0, BLOCK_D)
            pmask = ok[:, None] & (d < HEAD_DIM)[None, :]
            chan = kvh * HEAD_DIM + d[None, :]
            s = load_f16((row + DATA)[:, None], chan, pmask, ALIGNED)
            mn = load_f16((row + DATA + 2 * HEADS * HEAD_DIM)[:, None], chan, pmask, ALIGNED)
            x = codes * s + mn
        else:  # per token: (PAGE, HEADS) scales then mins
            s = load_f16(row + DATA, tok, ok, ALIGNED)
            mn = load_f16(row + DATA + 2 * PAGE * HEADS, tok, ok, ALIGNED)
            x = codes * s[:, None] + mn[:, None]
    return x


@triton.jit
def paged_tile(
    slab_ptr, stride_slab, fp_ptr, stride_fn, stride_ft, stride_fh, num_slabs,
    page, slot, t_ok, kvh, d, d_ok,
    IS_KEY: tl.constexpr, FMT: tl.constexpr, PACK: tl.constexpr,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_D: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """(BLOCK_N, BLOCK_D) keys or values of KV head `kvh` in the staging dtype for block ids `page` (int64) and slots:
    an id below `num_slabs` is a slab (dequantised), any other is staging block id - num_slabs (read as is);
    rows where not `t_ok` are zeros."""
    is_slab = page < num_slabs
    x = quant_tile(slab_ptr, stride_slab, page, slot, t_ok & is_slab, kvh,
                   IS_KEY, FMT, PACK, HEADS, HEAD_DIM, PAGE, BLOCK_D, ALIGNED)
    staged = t_ok & (page >= num_slabs)
    off = (page - num_slabs) * stride_fn + slot * stride_ft + kvh * stride_fh
    y = tl.load(fp_ptr + off[:, None] + d[None, :], mask=staged[:, None] & d_ok[None, :], other=0.0)
    return tl.where(is_slab[:, None], x.to(y.dtype), y)
