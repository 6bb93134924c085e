"""Triton paged decode attention over fp8 slabs (one scale per (token, head)).

A kernel specialised for this format next to the generic QUANT path of `triton_decode` (which serves the
other formats). It keeps the shape of the unquantized kernel: one program per (KV head, sequence, partition)
walks its keys in tiles of block_n, translates each key through the block table with one vector load, and
gathers the tile's codes with ONE 2-D load per operand (keys as (head_dim, block_n), values as (block_n,
head_dim): a key's codes of one head are one contiguous row of the slab). The code loads are typed fp8 and
feed the dots through one conversion (the hardware's e4m3 -> f16), so the compiler pipelines them into shared
memory with asynchronous copies as it does bf16 tiles and converts them to float16 dot operands after that.
The per-token scales never touch the elements: key scales multiply the scores, value scales the
probabilities. A scale is 2 bytes per key, too narrow for asynchronous copies, so with PREFETCH each tile's
scales are loaded while the tile before it is computed (else their latency is paid once per tile).
Keys that live in full-precision staging blocks (table entries >= num_slabs) go through
`triton_slabs.staged_attend`, only in tiles that hold any.

Numerics: float16 operands (queries must stay within float16's range; float32 queries and the interpreter use
float32), float32 scores and accumulators, probabilities times value scales rounded to float16 before P@V.
Outputs and partial results have the layout of `triton_decode`'s, whose merge kernel this module reuses.

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl
from torch import Tensor

from .launch_plan import DecodeLaunch
from .paged_kv import PagedKV
from .triton_common import ieee_dot, mma
from .triton_slabs import SlabArgs, load_f16, staged_attend

#: Pool formats this kernel reads. int8 slabs have the same layout, but through this kernel (its codes
#: converted by integer conversions) an H200 ran them slower than through the generic kernel (batch 64, 8k
#: context: 0.79 ms vs 0.70 ms), so they stay there.
TOKEN_SCALED_FORMATS = ("fp8",)
#: Codes loaded as bytes and reinterpreted as fp8 (`_load_codes`), else through fp8 pointers.
BYTE_LOADS = False
#: Largest grid extent along y (CUDA): a batch beyond it launches batch-major.
MAX_GRID_Y = 65535


@triton.jit
def _load_codes(byte_ptr, mask, BYTE_LOADS: tl.constexpr):
    """fp8 e4m3 codes at `byte_ptr` (0 where masked). BYTE_LOADS: loaded as bytes and reinterpreted, else
    through fp8 pointers (both feed the dots through the hardware's e4m3 -> f16 conversion)."""
    if BYTE_LOADS:
        codes = tl.load(byte_ptr, mask=mask, other=0).to(tl.float8e4nv, bitcast=True)
    else:
        codes = tl.load(byte_ptr.to(tl.pointer_type(tl.float8e4nv)), mask=mask, other=0.0)
    return codes


@triton.jit
def _tile_codes(bt_row, ks_ptr, vs_ptr, stride_ks, stride_vs, t0, end, kvh, d, d_ok, num_slabs,
                HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
                BYTE_LOADS: tl.constexpr):
    """The key tile [t0, t0 + BLOCK_N) (nothing from `end` on): its block-table entries and its sealed keys'
    codes (head_dim, BLOCK_N) and values' codes (BLOCK_N, head_dim) as fp8 (0 where not sealed)."""
    t = t0 + tl.arange(0, BLOCK_N)
    t_ok = t < end
    page = tl.load(bt_row + t // PAGE, mask=t_ok, other=0)
    sealed = t_ok & (page < num_slabs)
    row = ((t % PAGE) * HEADS + kvh) * HEAD_DIM  # the key's row of codes in its slab
    krow = ks_ptr + tl.where(sealed, page, 0).to(tl.int64) * stride_ks + row
    k_codes = _load_codes(krow[None, :] + d[:, None], sealed[None, :] & d_ok[:, None], BYTE_LOADS)
    vrow = vs_ptr + tl.where(sealed, page, 0).to(tl.int64) * stride_vs + row
    v_codes = _load_codes(vrow[:, None] + d[None, :], sealed[:, None] & d_ok[None, :], BYTE_LOADS)
    return page, k_codes, v_codes


@triton.jit
def _tile_scales(bt_row, ks_ptr, vs_ptr, stride_ks, stride_vs, t0, end, kvh, num_slabs,
                 HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, HEADS: tl.constexpr, BLOCK_N: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """The float16 key and value scales (as float32; 0 where not sealed) of the key tile [t0, t0 + BLOCK_N)."""
    DATA: tl.constexpr = PAGE * HEADS * HEAD_DIM  # code bytes of a slab; the float16 scales follow
    t = t0 + tl.arange(0, BLOCK_N)
    t_ok = t < end
    page = tl.load(bt_row + t // PAGE, mask=t_ok, other=0)
    sealed = t_ok & (page < num_slabs)
    tok = (t % PAGE) * HEADS + kvh
    blk = tl.where(sealed, page, 0).to(tl.int64)
    k_scale = load_f16(ks_ptr + blk * stride_ks + DATA, tok, sealed, ALIGNED)
    v_scale = load_f16(vs_ptr + blk * stride_vs + DATA, tok, sealed, ALIGNED)
    return k_scale, v_scale


@triton.jit
def _token_decode_kernel(
    q_ptr, ks_ptr, vs_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr,
    scale_log2, partition_size, num_slabs,
    stride_qb, stride_qh, stride_ks, stride_vs,
    stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh,
    stride_btb, stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr, HEADS_FIRST: tl.constexpr,
    ALIGNED: tl.constexpr, PREFETCH: tl.constexpr, BYTE_LOADS: tl.constexpr,
):
    if HEADS_FIRST:
        kvh = tl.program_id(0)
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    start = split * partition_size
    end = tl.minimum(start + partition_size, seq_len)

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_op = q.to(tl.float32) if IEEE_DOT else q.to(tl.float16)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    if PREFETCH:  # tile i + 1's scales are loaded during tile i (the code loads are the compiler's to pipeline)
        ks_n, vs_n = _tile_scales(bt_row, ks_ptr, vs_ptr, stride_ks, stride_vs, start, end, kvh, num_slabs,
                                  HEAD_DIM, PAGE, HEADS, BLOCK_N, ALIGNED)
    for t0 in range(start, end, BLOCK_N):
        page, k_codes, v_codes = _tile_codes(bt_row, ks_ptr, vs_ptr, stride_ks, stride_vs, t0, end, kvh, d, d_ok,
                                             num_slabs, HEAD_DIM, PAGE, HEADS, BLOCK_N, BYTE_LOADS)
        if PREFETCH:
            k_scale, v_scale = ks_n, vs_n
            ks_n, vs_n = _tile_scales(bt_row, ks_ptr, vs_ptr, stride_ks, stride_vs, t0 + BLOCK_N, end, kvh,
                                      num_slabs, HEAD_DIM, PAGE, HEADS, BLOCK_N, ALIGNED)
        else:
            k_scale, v_scale = _tile_scales(bt_row, ks_ptr, vs_ptr, stride_ks, stride_vs, t0, end, kvh, num_slabs,
                                            HEAD_DIM, PAGE, HEADS, BLOCK_N, ALIGNED)
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        sealed = t_ok & (page < num_slabs)
        s = mma(q_op, k_codes.to(q_op.dtype), IEEE_DOT)
        s = tl.where(sealed[None, :], s * (k_scale * scale_log2)[None, :], float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no sealed key leaves rows at zero
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        p_op = (p * v_scale[None, :]).to(q_op.dtype)
        acc = acc * alpha[:, None] + mma(p_op, v_codes.to(q_op.dtype), IEEE_DOT)
        m_i = m_new
        staged = t_ok & (page >= num_slabs)
        if tl.max(staged.to(tl.int32), 0) > 0:
            allowed = (rows >= 0)[:, None] & staged[None, :]
            m_i, l_i, acc = staged_attend(q, m_i, l_i, acc, k_ptr, v_ptr, stride_kn, stride_kt, stride_kh,
                                          stride_vn, stride_vt, stride_vh, tl.where(staged, page - num_slabs, 0),
                                          t % PAGE, staged, allowed, kvh, d, d_ok, scale_log2, IEEE_DOT)

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        base = b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_ptr + base[:, None] + d[None, :], o, mask=mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=row_ok)
    else:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


def launch_token_decode(query: Tensor, kv: PagedKV, out: Tensor, plan: DecodeLaunch, group: int, scale: float,
                        parts: Tensor, lse: Tensor, heads_first: bool, prefetch: bool = True,
                        byte_loads: bool = BYTE_LOADS) -> None:
    """Kernel 1 of a decode over an fp8 view into `out` (one split) or `parts` / `lse` (several; the
    caller merges them). `prefetch`: load each tile's scales one tile ahead (see the module docstring);
    `byte_loads`: see `_load_codes`; `plan.max_registers` caps the registers per thread (None: the
    compiler's choice). ValueError for another pool format."""
    slabs = SlabArgs.of(kv)
    if kv.quant is None or kv.quant.format.name not in TOKEN_SCALED_FORMATS:
        name = None if kv.quant is None else kv.quant.format.name
        raise ValueError(f"pool format {name!r}: this kernel reads {', '.join(TOKEN_SCALED_FORMATS)} slabs")
    batch, _heads, dim = (int(x) for x in query.shape)
    k, v = kv.key_cache, kv.value_cache
    grid = (kv.num_kv_heads, batch) if heads_first else (batch, kv.num_kv_heads)
    _token_decode_kernel[(*grid, plan.num_splits)](
        query, slabs.keys, slabs.values, k, v, kv.block_tables, kv.seq_lens, out, parts, lse,
        scale * math.log2(math.e), plan.partition_size, slabs.num_slabs,
        query.stride(0), query.stride(1), slabs.keys.stride(0), slabs.values.stride(0),
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        kv.block_tables.stride(0), out.stride(0), out.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        GROUP=group, HEAD_DIM=dim, PAGE=kv.block_size, HEADS=kv.num_kv_heads,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d,
        SPLIT=plan.num_splits > 1, IEEE_DOT=ieee_dot(query.dtype), HEADS_FIRST=heads_first,
        ALIGNED=slabs.aligned, PREFETCH=prefetch, BYTE_LOADS=byte_loads, num_warps=plan.num_warps,
        num_stages=plan.num_stages, **({} if plan.max_registers is None else {"maxnreg": plan.max_registers}),
    )


def token_scaled(kv: PagedKV) -> bool:
    """Whether `kv` is a quantized view this module's kernel reads."""
    return kv.quant is not None and kv.quant.format.name in TOKEN_SCALED_FORMATS

