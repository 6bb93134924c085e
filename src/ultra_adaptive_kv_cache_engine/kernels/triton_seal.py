"""Triton quantize-on-write: full-precision staging blocks sealed into quantized pool slabs (all layers, K and V).

`_seal_kernel`, grid (num_ids, num_layers, num_kv_heads), launched once for keys and once for values: one
program reads one head of one layer's keys (or values) of staging block ``staging_ids[i]``, (block_size,
head_dim), computes its scales (and mins) in float32 exactly as `PoolFormat.quantize` does (IEEE divisions
with `div_rn`, the scale rounded to float16 and capped at float16's max, a zero scale stored as 1, codes
rounded half to even), and writes its codes and float16 parameters into the slab of pool block
``block_ids[i]`` at the offsets of `triton_slabs`; the program of head 0 also zeroes the slab's padding.
Every format's slabs are bit-identical to the reference's (fp8 codes are rounded with integer ops, see
`_to_e4m3`). Ids out of
range are skipped (nothing written); ids are not checked on the host (no synchronisation).

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl
from torch import Tensor

from .reference_blocks import check_seal_inputs
from .triton_common import FAST_DTYPES
from .triton_slabs import format_code, store_f16

if TYPE_CHECKING:
    from ..compression.pool_formats import PoolFormat



@triton.jit
def _fp16_scale(s):
    """`s` as the float16 scale actually stored, back in float32: capped at float16's max, 0 -> 1."""
    s = tl.minimum(s, 65504.0).to(tl.float16).to(tl.float32)
    return tl.where(s > 0.0, s, 1.0)


@triton.jit
def _round_even(x):
    """x rounded to an integer, half to even, for |x| < 2**22 (adding 1.5 * 2**23 leaves no fraction bits)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def _to_e4m3(y):
    """float32 y in [-448, 448] -> float8 e4m3fn bits (uint8), rounded to nearest even like torch's cast.
    Written out with integer ops (the interpreter's own conversion mis-rounds across powers of two): the
    magnitude is rounded to its e4m3 quantum 2**max(e - 3, -9) by adding and subtracting 1.5 * 2**23 quanta."""
    bits = y.to(tl.int32, bitcast=True)
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    r = (a + 12582912.0 * quantum) - 12582912.0 * quantum
    rbits = r.to(tl.int32, bitcast=True)
    normal = (((rbits >> 23) - 120) << 3) | ((rbits >> 20) & 7)  # biased exponent 7, 3 mantissa bits
    code = tl.where(r >= 0.015625, normal, (r * 512.0).to(tl.int32))  # below 2**-6: multiples of 2**-9
    return (code | ((bits >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _pack(q, PACK: tl.constexpr):
    """Codes (rows, cols) int32 in [0, 2**(8 / PACK)) -> bytes (rows, cols / PACK), low bits first."""
    rows: tl.constexpr = q.shape[0]
    cols: tl.constexpr = q.shape[1]
    if PACK == 2:
        lo, hi = tl.split(tl.reshape(q, [rows, cols // 2, 2]))
        packed = lo | (hi << 4)
    else:
        even, odd = tl.split(tl.reshape(q, [rows, cols // 4, 2, 2]))  # even: codes 4i, 4i + 2
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        packed = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
    return packed.to(tl.uint8)


@triton.jit
def _seal_kernel(
    st_ptr, sid_ptr, pool_ptr, bid_ptr, num_staging, num_blocks,
    stride_sn, stride_sl, stride_sk, stride_st, stride_sh, stride_pn, stride_pl, stride_pk,
    KIND: tl.constexpr, FMT: tl.constexpr, PACK: tl.constexpr, LEVELS: tl.constexpr,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, SLAB: tl.constexpr, PAD_START: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr,
):
    i = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    h = tl.program_id(2)
    sid = tl.load(sid_ptr + i).to(tl.int64)
    bid = tl.load(bid_ptr + i).to(tl.int64)
    valid = (sid >= 0) & (sid < num_staging) & (bid >= 0) & (bid < num_blocks)
    t = tl.arange(0, BLOCK_T)
    d = tl.arange(0, BLOCK_D)
    t_ok = t < tl.where(valid, PAGE, 0)  # an id out of range writes nothing
    d_ok = d < tl.where(valid, HEAD_DIM, 0)
    m = t_ok[:, None] & d_ok[None, :]
    src = st_ptr + sid * stride_sn + layer * stride_sl + KIND * stride_sk + h * stride_sh
    x = tl.load(src + t[:, None] * stride_st + d[None, :], mask=m, other=0.0).to(tl.float32)
    slab = pool_ptr + bid * stride_pn + layer * stride_pl + KIND * stride_pk
    DP: tl.constexpr = HEAD_DIM // PACK
    DATA: tl.constexpr = PAGE * HEADS * DP
    tok = t * HEADS + h
    if FMT < 2:  # fp8 / int8: symmetric, one scale per token
        s = _fp16_scale(tl.math.div_rn(tl.max(tl.abs(x), 1), LEVELS * 1.0))
        y = tl.minimum(tl.maximum(tl.math.div_rn(x, s[:, None]), -LEVELS * 1.0), LEVELS * 1.0)
        if FMT == 0:
            codes = _to_e4m3(y)
        else:
            codes = _round_even(y).to(tl.int8).to(tl.uint8, bitcast=True)
        tl.store(slab + tok[:, None] * DP + d[None, :], codes, mask=m)
        store_f16(slab + DATA, tok, s, t_ok, ALIGNED)
    else:  # int4 / int2: affine; keys per channel (over the tokens), values per token (over head_dim)
        AXIS: tl.constexpr = 0 if KIND == 0 else 1
        mn = tl.min(tl.where(m, x, float("inf")), AXIS)
        mx = tl.max(tl.where(m, x, float("-inf")), AXIS)
        s = _fp16_scale(tl.math.div_rn(mx - mn, LEVELS * 1.0))
        if KIND == 0:
            q = _round_even(tl.math.div_rn(x - mn[None, :], s[None, :]))
        else:
            q = _round_even(tl.math.div_rn(x - mn[:, None], s[:, None]))
        codes = _pack(tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0).to(tl.int32), PACK)
        dp = tl.arange(0, BLOCK_D // PACK)
        tl.store(slab + tok[:, None] * DP + dp[None, :], codes, mask=t_ok[:, None] & (dp < DP)[None, :])
        if KIND == 0:
            chan = h * HEAD_DIM + d
            store_f16(slab + DATA, chan, s, d_ok, ALIGNED)
            store_f16(slab + DATA + 2 * HEADS * HEAD_DIM, chan, mn, d_ok, ALIGNED)
        else:
            store_f16(slab + DATA, tok, s, t_ok, ALIGNED)
            store_f16(slab + DATA + 2 * PAGE * HEADS, tok, mn, t_ok, ALIGNED)
    if h == 0:  # zero the padding after the parameters, as the reference does
        for p0 in range(PAD_START, SLAB, 512):
            p = p0 + tl.arange(0, 512)
            tl.store(slab + p, tl.zeros([512], tl.uint8), mask=p < tl.where(valid, SLAB, 0))


def triton_seal_blocks(
    staging: Tensor, staging_ids: Tensor, pool: Tensor, block_ids: Tensor, format: PoolFormat
) -> None:
    """Quantise staging block ``staging_ids[i]`` (all layers, K and V) into pool block ``block_ids[i]``, in
    place; see the module docstring."""
    slab = check_seal_inputs(staging, staging_ids, pool, block_ids, format)
    if staging.dtype not in FAST_DTYPES:
        raise ValueError(f"staging has dtype {staging.dtype}; the Triton seal takes float16, bfloat16 or float32")
    fmt, pack = format_code(format.name)
    count = int(block_ids.shape[0])
    _, layers, _, bs, heads, dim = (int(x) for x in staging.shape)
    if count == 0 or layers == 0:
        return
    levels = 448 if fmt == 0 else (127 if fmt == 1 else (1 << (8 // pack)) - 1)
    aligned = (bs * heads * (dim // pack)) % 2 == 0 and pool.stride(0) % 2 == 0 and pool.stride(2) % 2 == 0
    data = bs * heads * (dim // pack)
    for kind in (0, 1):
        params = bs * heads if fmt < 2 else (2 * heads * dim if kind == 0 else 2 * bs * heads)
        _seal_kernel[(count, layers, heads)](
            staging, staging_ids, pool, block_ids, int(staging.shape[0]), int(pool.shape[0]),
            staging.stride(0), staging.stride(1), staging.stride(2), staging.stride(3), staging.stride(4),
            pool.stride(0), pool.stride(1), pool.stride(2),
            KIND=kind, FMT=fmt, PACK=pack, LEVELS=levels, HEADS=heads, HEAD_DIM=dim, PAGE=bs, SLAB=slab,
            PAD_START=data + 2 * params, BLOCK_T=triton.next_power_of_2(bs),
            BLOCK_D=max(16, triton.next_power_of_2(dim)), ALIGNED=aligned,
            num_warps=4,
        )
