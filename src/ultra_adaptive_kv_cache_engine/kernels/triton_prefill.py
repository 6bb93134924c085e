"""Triton paged prefill attention, the fast twin of `reference_prefill_attention`.

Grid (num_q_tiles, batch, num_kv_heads). A program takes block_q consecutive new tokens of one sequence and
all query heads of one GQA group, flattened into block_m = block_q * group rows (row r is token r // group,
head r % group), so the keys and values of the group are read once per tile. It walks the sequence's keys
from position 0 up to the tile's last query position, translating positions through the block table, with
the causal mask ``key_pos <= query_pos`` where query_pos = seq_len - q_len + j for the j-th new token
(full attention over the cached prefix, causal over the new tokens; their KV must already be written).

Numerics as in `triton_decode`: float32 scores and accumulators, probabilities rounded to the KV dtype
before P@V, IEEE dot products for float32 inputs. Values of seq_lens and query_start_loc are never read on
the host, except to find `max_query_len` when the caller does not give it (one synchronisation).

Quantized views (`kv.quant` set): the QUANT constexpr specialisation reads sealed keys straight from their
slabs and staged keys from the staging blocks, tile by tile (`triton_slabs.quant_tile_update`).

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import require_like, require_out, require_positive_scale, require_query_starts, require_tensor
from .launch_plan import plan_prefill
from .paged_kv import PagedKV
from .triton_common import FAST_DTYPES, ieee_dot, mma, softmax_update
from .triton_slabs import SlabArgs, column_order, quant_operands, quant_tile_update, sub_block


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, starts_ptr, out_ptr, ks_ptr, vs_ptr,
    scale_log2, num_slabs,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kn, stride_kt, stride_kh,
    stride_vn, stride_vt, stride_vh,
    stride_btb, stride_ks, stride_vs,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    QUANT: tl.constexpr, FMT: tl.constexpr, PACK: tl.constexpr, HEADS: tl.constexpr, ALIGNED: tl.constexpr,
    SUB: tl.constexpr, WORDS: tl.constexpr,
):
    tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(starts_ptr + b).to(tl.int32)
    q_len = tl.load(starts_ptr + b + 1).to(tl.int32) - q_start
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    context = seq_len - q_len
    tok0 = tile * BLOCK_Q

    rows = tl.arange(0, BLOCK_M)
    tok = tok0 + rows // GROUP
    heads = kvh * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (tok < q_len)
    q_pos = tl.where(row_ok, context + tok, seq_len - 1)  # padding rows see every key: no empty softmax
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    col = column_order(d, PACK, WORDS)  # memory column of operand column d (d itself unless WORDS)
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + col[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    # keys up to the tile's last query position; none when the tile holds no new token
    kv_end = tl.where(tok0 < q_len, tl.minimum(seq_len, context + tl.minimum(tok0 + BLOCK_Q, q_len)), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_btb
    if QUANT:
        q_op, q_sum = quant_operands(q, IEEE_DOT)
    for t0 in range(0, kv_end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < kv_end
        allowed = t_ok[None, :] & (t[None, :] <= q_pos[:, None])
        if QUANT:  # ids below num_slabs are quantized slabs, the others staging blocks (see triton_slabs)
            m_i, l_i, acc = quant_tile_update(
                q, q_op, q_sum, m_i, l_i, acc, ks_ptr, vs_ptr, stride_ks, stride_vs,
                k_ptr, v_ptr, stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh,
                bt_row, t0, kv_end, allowed, kvh, col, d_ok, num_slabs, scale_log2,
                FMT, PACK, HEADS, HEAD_DIM, PAGE, BLOCK_N, BLOCK_D, SUB, ALIGNED, WORDS, IEEE_DOT)
        else:
            page = tl.load(bt_row + t // PAGE, mask=t_ok, other=0).to(tl.int64)
            slot = t % PAGE
            k_off = page * stride_kn + slot * stride_kt + kvh * stride_kh
            v_off = page * stride_vn + slot * stride_vt + kvh * stride_vh
            k_t = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=t_ok[None, :] & d_ok[:, None], other=0.0)
            s = mma(q, k_t, IEEE_DOT)
            s = tl.where(allowed, s * scale_log2, float("-inf"))
            v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
            m_i, l_i, acc = softmax_update(s, v, m_i, l_i, acc, IEEE_DOT)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + col[None, :]
    tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _check(query: Tensor, query_start_loc: Tensor, kv: PagedKV, out: Tensor | None) -> int:
    require_tensor("query", query, 3)
    group = kv.check_query(query)
    if query.dtype not in FAST_DTYPES:
        raise ValueError(f"query has dtype {query.dtype}; the Triton kernels take float16, bfloat16 or float32")
    require_query_starts(query_start_loc, kv.batch_size)
    require_like("query_start_loc", query_start_loc, "key_cache", kv.key_cache, same_dtype=False)
    require_out(out, tuple(query.shape), query)
    for name, tensor in (("query", query), ("out", out)):
        if tensor is not None and tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {tensor.stride()}")
    return group


def triton_prefill_attention(
    query: Tensor,
    query_start_loc: Tensor,
    kv: PagedKV,
    max_query_len: int | None = None,
    scale: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Paged prefill attention of packed new tokens (total_q, num_q_heads, head_dim); returns that shape.

    `max_query_len` (the longest new-token span) sizes the grid; when None it is read from the device.
    """
    group = _check(query, query_start_loc, kv, out)
    scale = require_positive_scale(scale, kv.head_dim)
    if out is None:
        out = torch.empty_like(query)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if kv.batch_size else 0
    plan = plan_prefill(group, kv.head_dim, max_query_len, query.element_size())
    if query.shape[0] == 0 or plan.num_q_tiles == 0 or kv.batch_size == 0:
        return out
    k, v = kv.key_cache, kv.value_cache
    slabs = SlabArgs.of(kv)
    _prefill_kernel[(plan.num_q_tiles, kv.batch_size, kv.num_kv_heads)](
        query, k, v, kv.block_tables, kv.seq_lens, query_start_loc, out, slabs.keys, slabs.values,
        scale * math.log2(math.e), slabs.num_slabs,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kv.block_tables.stride(0), slabs.keys.stride(0), slabs.values.stride(0),
        GROUP=group, HEAD_DIM=kv.head_dim, PAGE=kv.block_size,
        BLOCK_M=plan.block_m, BLOCK_Q=plan.block_q, BLOCK_N=plan.block_n, BLOCK_D=plan.block_d,
        IEEE_DOT=ieee_dot(query.dtype), **slabs.constexprs(),
        SUB=sub_block(kv.block_size, plan.block_n),
        num_warps=plan.num_warps, num_stages=plan.num_stages,
    )
    return out
