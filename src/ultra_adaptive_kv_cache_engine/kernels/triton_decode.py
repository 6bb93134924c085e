"""Triton paged decode attention (split-K / flash-decoding), the fast twin of `reference_decode_attention`.

Kernel 1 (`_decode_partition_kernel`), grid (num_kv_heads, batch, num_splits) (or (batch, num_kv_heads,
num_splits) when the launch is not `heads_first` or the batch exceeds `MAX_GRID_Y`): one program loads the query rows of one GQA group
(padded to block_m rows), walks its partition of the context in tiles of block_n keys and keeps an online
softmax in base 2 with float32 accumulators. Each tile translates its keys through the block table with one
vector load (the block id of every key: a tile of block_n keys over blocks of PAGE tokens reads
block_n / PAGE distinct ids, adjacent in memory, so one or two sectors), then gathers its keys and values
with one load each; any block size works and a tile may span several blocks. With one split it writes the
normalised output directly; otherwise it writes its normalised partial output and log2-sum-exp.
Kernel 2 (`_decode_merge_kernel`), grid (batch * num_q_heads,), heads fastest: merges the partitions that
hold keys.

Numerics: scores and accumulators are float32; probabilities are rounded to the KV dtype before the P@V
product (as FlashAttention does); float32 inputs use IEEE (not TF32) dot products. No value of seq_lens or
block_tables is read on the host (no synchronisation); a sequence of length 0 yields zeros. Semantics and
invariants: see `reference_attention` and `paged_kv`.

Quantized views (`kv.quant` set): the same kernel specialised by the QUANT constexpr (the unquantized
specialisation compiles to exactly the code it had before) reads each tile's sealed keys straight from their
slabs and its staged keys from the full-precision staging blocks (`triton_slabs.quant_tile_update`),
planned by `plan_quant_decode`; numerics there: float16 tensor-core operands (queries must stay within
float16's range), see `triton_slabs`.

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # an older or newer layout of triton: nothing to catch by name
    class OutOfResources(Exception):  # type: ignore[no-redef]
        """Stands in for triton's shared-memory error when triton does not export it."""

from .checks import require_out, require_positive_scale, require_tensor
from .launch_plan import DecodeLaunch, DecodeShape, plan_decode, plan_quant_decode, plan_token_decode
from .paged_kv import PagedKV
from .triton_common import FAST_DTYPES, ieee_dot, mma, num_sms, softmax_update
from .triton_slabs import SlabArgs, column_order, quant_operands, quant_tile_update, sub_block
from .triton_token_decode import BYTE_LOADS, launch_token_decode, token_scaled

#: Largest grid extent along y (CUDA): a batch beyond it launches batch-major.
MAX_GRID_Y = 65535


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, part_ptr, lse_ptr, ks_ptr, vs_ptr,
    scale_log2, partition_size, num_slabs,
    stride_qb, stride_qh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_btb, stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ks, stride_vs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT: tl.constexpr, IEEE_DOT: tl.constexpr, HEADS_FIRST: tl.constexpr,
    QUANT: tl.constexpr, FMT: tl.constexpr, PACK: tl.constexpr, HEADS: tl.constexpr, ALIGNED: tl.constexpr,
    SUB: tl.constexpr, WORDS: tl.constexpr,
):
    if HEADS_FIRST:  # one sequence's KV heads are adjacent programs: they read the same blocks together
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
    col = column_order(d, PACK, WORDS)  # memory column of operand column d (d itself unless WORDS)
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + col[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    if QUANT:
        q_op, q_sum = quant_operands(q, IEEE_DOT)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        if QUANT:  # ids below num_slabs are quantized slabs, the others staging blocks (see triton_slabs)
            allowed = (rows >= 0)[:, None] & t_ok[None, :]
            m_i, l_i, acc = quant_tile_update(
                q, q_op, q_sum, m_i, l_i, acc, ks_ptr, vs_ptr, stride_ks, stride_vs,
                k_ptr, v_ptr, stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh,
                bt_row, t0, end, allowed, kvh, col, d_ok, num_slabs, scale_log2,
                FMT, PACK, HEADS, HEAD_DIM, PAGE, BLOCK_N, BLOCK_D, SUB, ALIGNED, WORDS, IEEE_DOT)
        else:
            page = tl.load(bt_row + t // PAGE, mask=t_ok, other=0).to(tl.int64)  # the tile's block ids at once
            slot = t % PAGE
            k_off = page * stride_kn + slot * stride_kt + kvh * stride_kh
            v_off = page * stride_vn + slot * stride_vt + kvh * stride_vh
            k_t = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=t_ok[None, :] & d_ok[:, None], other=0.0)
            s = mma(q, k_t, IEEE_DOT)
            s = tl.where(t_ok[None, :], s * scale_log2, float("-inf"))
            v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, IEEE_DOT)

    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        base = b.to(tl.int64) * stride_pb + heads * stride_ph + split * stride_ps
        tl.store(part_ptr + base[:, None] + col[None, :], o, mask=mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=row_ok)
    else:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + col[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _decode_merge_kernel(
    part_ptr, lse_ptr, lens_ptr, out_ptr,
    num_heads, num_splits, partition_size,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
):
    pid = tl.program_id(0)  # adjacent programs merge adjacent rows (heads) of one sequence
    h = pid % num_heads
    b = pid // num_heads
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    lse_row = lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh
    part_row = part_ptr + b.to(tl.int64) * stride_pb + h * stride_ph
    s_all = tl.arange(0, BLOCK_S)
    ok_all = (s_all < num_splits) & (s_all * partition_size < seq_len)  # partitions that hold keys
    top = tl.max(tl.load(lse_row + s_all, mask=ok_all, other=float("-inf")), 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_sum = tl.zeros([CHUNK], tl.float32)
    for c0 in range(0, num_splits, CHUNK):
        s = c0 + tl.arange(0, CHUNK)
        ok = (s < num_splits) & (s * partition_size < seq_len)
        w = tl.where(ok, tl.exp2(tl.load(lse_row + s, mask=ok, other=float("-inf")) - top), 0.0)
        parts = tl.load(part_row + s[:, None] * stride_ps + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.sum(parts * w[:, None], 0)
        w_sum += w
    total = tl.sum(w_sum, 0)
    o = acc / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def _check(query: Tensor, kv: PagedKV, out: Tensor | None) -> int:
    require_tensor("query", query, 3)
    group = kv.check_query(query)
    if query.shape[0] != kv.batch_size:
        raise ValueError(f"query has batch {query.shape[0]} but block_tables has {kv.batch_size} rows")
    if query.dtype not in FAST_DTYPES:
        raise ValueError(f"query has dtype {query.dtype}; the Triton kernels take float16, bfloat16 or float32")
    if query.stride(-1) != 1:
        raise ValueError(f"query must have a contiguous last dimension, got strides {query.stride()}")
    require_out(out, tuple(query.shape), query)
    if out is not None and out.stride(-1) != 1:
        raise ValueError(f"out must have a contiguous last dimension, got strides {out.stride()}")
    return group


def _launch_partitions(query: Tensor, kv: PagedKV, out: Tensor, plan: DecodeLaunch, group: int, scale: float,
                       specialised: bool = True, prefetch: bool = True, byte_loads: bool | None = None) -> None:
    """Kernel 1, then (when split) kernel 2; the partial buffers come from the caching allocator (or the
    private pool of a CUDA graph being captured). fp8 / int8 views take `triton_token_decode`'s kernel 1
    (scales loaded a tile ahead unless `prefetch` is False) unless `specialised` is False (the generic QUANT
    path); both switches, and `byte_loads` (None: the fp8 kernel's default), exist for the benchmark's
    comparisons."""
    batch, heads, dim = (int(x) for x in query.shape)
    split = plan.num_splits > 1
    parts, lse = out, out[:, :, 0]  # placeholders with the right rank when not split (never touched)
    if split:
        parts = torch.empty((batch, heads, plan.num_splits, plan.block_d), dtype=torch.float32, device=query.device)
        lse = torch.empty((batch, heads, plan.num_splits), dtype=torch.float32, device=query.device)
    heads_first = plan.heads_first and batch <= MAX_GRID_Y
    if specialised and token_scaled(kv):
        launch_token_decode(query, kv, out, plan, group, scale, parts, lse, heads_first, prefetch,
                            BYTE_LOADS if byte_loads is None else byte_loads)
    else:
        _launch_generic(query, kv, out, plan, group, scale, parts, lse, heads_first)
    if split:
        _decode_merge_kernel[(batch * heads,)](
            parts, lse, kv.seq_lens, out, heads, plan.num_splits, plan.partition_size,
            parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=dim, BLOCK_D=plan.block_d, BLOCK_S=max(16, triton.next_power_of_2(plan.num_splits)),
            CHUNK=16, num_warps=4,
        )


def planned_launch(kv: PagedKV, shape: DecodeShape, sms: int) -> DecodeLaunch:
    """The launch `triton_decode_attention` plans for `kv`: bf16 blocks `plan_decode`, fp8 slabs (their own
    kernel) `plan_token_decode`, the other quantized formats `plan_quant_decode`."""
    if kv.quant is None:
        return plan_decode(shape, sms)
    return plan_token_decode(shape, sms) if token_scaled(kv) else plan_quant_decode(shape, sms)


def triton_decode_attention(
    query: Tensor, kv: PagedKV, scale: float | None = None, out: Tensor | None = None,
    launch: DecodeLaunch | None = None,
) -> Tensor:
    """Paged decode attention; returns (batch, num_q_heads, head_dim). `launch` overrides the planner.

    A planned launch whose tiles do not fit the device's shared memory (a 128-key tile on a GPU smaller than
    an H100) is retried once with 64-key tiles and 2 stages.
    """
    group = _check(query, kv, out)
    scale = require_positive_scale(scale, kv.head_dim)
    batch, heads, dim = (int(x) for x in query.shape)
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    shape = kv.decode_shape(query)
    plan = launch if launch is not None else planned_launch(kv, shape, num_sms(query.device))
    if plan.block_m < group or plan.block_d < dim or plan.num_splits * plan.partition_size < kv.max_len_bound:
        raise ValueError(f"launch {plan} does not cover group={group}, head_dim={dim}, length {kv.max_len_bound}")
    try:
        _launch_partitions(query, kv, out, plan, group, scale)
    except OutOfResources:
        if launch is not None or plan.block_n <= 64:
            raise
        planner = plan_decode if kv.quant is None else plan_quant_decode
        small = planner(shape, num_sms(query.device), num_splits=plan.num_splits, block_n=64)
        small = dataclasses.replace(small, heads_first=plan.heads_first, num_stages=min(small.num_stages, plan.num_stages))
        _launch_partitions(query, kv, out, small, group, scale)
    return out


def _launch_generic(query: Tensor, kv: PagedKV, out: Tensor, plan: DecodeLaunch, group: int, scale: float,
                    parts: Tensor, lse: Tensor, heads_first: bool) -> None:
    """Kernel 1 of this module: unquantized views, and quantized ones of any pool format."""
    batch, dim = int(query.shape[0]), int(query.shape[2])
    k, v = kv.key_cache, kv.value_cache
    slabs = SlabArgs.of(kv)
    split = plan.num_splits > 1
    grid = (kv.num_kv_heads, batch) if heads_first else (batch, kv.num_kv_heads)
    _decode_partition_kernel[(*grid, plan.num_splits)](
        query, k, v, kv.block_tables, kv.seq_lens, out, parts, lse, slabs.keys, slabs.values,
        scale * math.log2(math.e), plan.partition_size, slabs.num_slabs,
        query.stride(0), query.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv.block_tables.stride(0), out.stride(0), out.stride(1),
        parts.stride(0), parts.stride(1), parts.stride(2), lse.stride(0), lse.stride(1),
        slabs.keys.stride(0), slabs.values.stride(0),
        GROUP=group, HEAD_DIM=dim, PAGE=kv.block_size,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d,
        SPLIT=split, IEEE_DOT=ieee_dot(query.dtype), HEADS_FIRST=heads_first,
        **slabs.constexprs(), SUB=sub_block(kv.block_size, plan.block_n), num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
