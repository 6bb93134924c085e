"""Plain-PyTorch paged attention: the reference twin of the Triton kernels and the CPU path.

Both functions attend sequence by sequence: they copy exactly that sequence's blocks of the layer
(`index_select` over its block table; with a quantized pool, sealed blocks dequantised by the pool format and
the others read from the staging blocks, see `PagedKV`), view them as (positions, kv_heads, head_dim) and slice to its length,
so no padding is built and slots past a sequence's end (which may hold anything, NaN included) are never
read; then one `scaled_dot_product_attention` in float32 (float64 when the inputs are float64), with a
lower-right causal mask only when the sequence has several new tokens (a single query attends to every
position: its query heads become the rows of their KV head, no mask, no repeated KV), returning the query's
dtype. They check every value-dependent invariant of `PagedKV` (block ids in range, 1 <= seq_lens[b] <=
max_blocks * block_size, query lengths <= sequence lengths; the first two skipped for a view that
`PagedKV.checked` already checked) and so may synchronise with the device; they are written for clarity and
CPU use, not for speed on a GPU.

Semantics (shared with the Triton kernels):
- decode: query (batch, num_q_heads, head_dim) is the token at position seq_lens[b] - 1 of sequence b; it
  attends to positions 0 .. seq_lens[b] - 1. Query head h reads KV head h // (num_q_heads // num_kv_heads).
- prefill: query (total_q, num_q_heads, head_dim) packs the new tokens of every sequence, sequence b owning
  rows query_start_loc[b] .. query_start_loc[b + 1] - 1; their KV is already in the cache (write it first
  with `write_kv`), they are the last q_len_b tokens of the sequence, and the j-th of them attends to
  positions 0 .. seq_lens[b] - q_len_b + j (causal over the new tokens, full over the cached prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import require_out, require_positive_scale, require_query_starts, require_tensor
from .paged_kv import PagedKV


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference attention computes in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lengths(kv: PagedKV) -> list[int]:
    """Host copy of seq_lens after the value checks (`PagedKV.checked`), skipped when already done."""
    return list(kv.checked_lens if kv.checked_lens is not None else kv.checked().checked_lens)  # type: ignore[arg-type]


def _blocks_of(kv: PagedKV, blocks: Tensor, is_key: bool, dtype: torch.dtype) -> Tensor:
    """The blocks `blocks` (n,) of the layer as (n, block_size, heads, head_dim) in `dtype`: from the cache, or
    with `quant` entries < N dequantised from their slabs and the others read from the staging blocks."""
    cache = kv.key_cache if is_key else kv.value_cache
    quant = kv.quant
    if quant is None:
        return cache.index_select(0, blocks).to(dtype)
    n_sealed = quant.num_blocks
    sealed = blocks < n_sealed
    out = torch.empty((int(blocks.shape[0]), *cache.shape[1:]), dtype=dtype, device=cache.device)
    slabs = quant.key_slabs if is_key else quant.value_slabs
    if bool(sealed.any()):
        out[sealed] = quant.format.dequantize(slabs.index_select(0, blocks[sealed]), is_key, kv.block_size,
                                              kv.num_kv_heads, kv.head_dim, dtype)
    if not bool(sealed.all()):
        out[~sealed] = cache.index_select(0, blocks[~sealed] - n_sealed).to(dtype)
    return out


def _gather_sequence(kv: PagedKV, b: int, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Keys and values of sequence b's first n positions as (1, kv_heads, n, head_dim) in `dtype`: only its
    blocks are copied (one `index_select` each, or dequantised), then viewed and sliced: slots past its end are
    never read."""
    heads, dim = kv.num_kv_heads, kv.head_dim
    blocks = kv.block_tables[b, : -(-n // kv.block_size)].long()
    keys = _blocks_of(kv, blocks, True, dtype).view(-1, heads, dim)[:n]
    values = _blocks_of(kv, blocks, False, dtype).view(-1, heads, dim)[:n]
    return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]


def attend_sequence(query: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    """Softmax attention of query (T, Hq, D), the last T of the L positions of keys/values (1, Hkv, L, D):
    row j attends to positions 0 .. L - T + j (a single row attends to all, no mask). Returns (T, Hq, D);
    query head h reads KV head h // (Hq // Hkv)."""
    t, q_heads, dim = (int(x) for x in query.shape)
    kv_heads, length = int(keys.shape[1]), int(keys.shape[2])
    if t == 1:  # one row attends to every position: the query heads of a KV head are its rows, no mask
        q = query.reshape(1, kv_heads, q_heads // kv_heads, dim)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale).reshape(1, q_heads, dim)
    positions = torch.arange(length, device=keys.device)
    allowed = positions[None, :] <= (length - t + torch.arange(t, device=keys.device))[:, None]
    gqa = q_heads != kv_heads
    out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys, values,
                                         attn_mask=allowed[None, None], scale=scale, enable_gqa=gqa)
    return out[0].transpose(0, 1)


def _emit(result: Tensor, dtype: torch.dtype, out: Tensor | None) -> Tensor:
    if out is None:
        return result.to(dtype)
    out.copy_(result)
    return out


def reference_decode_attention(
    query: Tensor, kv: PagedKV, scale: float | None = None, out: Tensor | None = None
) -> Tensor:
    """Attention of one new token per sequence over its paged KV; returns (batch, num_q_heads, head_dim)."""
    require_tensor("query", query, 3)
    kv.check_query(query)
    if query.shape[0] != kv.batch_size:
        raise ValueError(f"query has batch {query.shape[0]} but block_tables has {kv.batch_size} rows")
    require_out(out, tuple(query.shape), query)
    scale = require_positive_scale(scale, kv.head_dim)
    lens = _lengths(kv)
    ct = compute_dtype(query.dtype)
    result = torch.empty(query.shape, dtype=ct, device=query.device)
    for b, n in enumerate(lens):
        keys, values = _gather_sequence(kv, b, n, ct)
        result[b : b + 1] = attend_sequence(query[b : b + 1].to(ct), keys, values, scale)
    return _emit(result, query.dtype, out)


def _query_spans(query_start_loc: Tensor, total_q: int, lens: list[int]) -> list[tuple[int, int]]:
    """(start, end) rows of each sequence's new tokens, after checking offsets against total_q and lengths."""
    starts = [int(x) for x in query_start_loc.tolist()]
    if starts[0] != 0 or starts[-1] != total_q:
        raise ValueError(f"query_start_loc must start at 0 and end at total_q={total_q}, got {starts}")
    spans = list(zip(starts[:-1], starts[1:], strict=True))
    for b, (s, e) in enumerate(spans):
        if not 0 <= e - s <= lens[b]:
            raise ValueError(
                f"sequence {b} has {e - s} new tokens (query_start_loc {s}..{e}); expected 0..seq_lens[b]={lens[b]}"
            )
    return spans


def reference_prefill_attention(
    query: Tensor,
    query_start_loc: Tensor,
    kv: PagedKV,
    max_query_len: int | None = None,
    scale: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Causal attention of packed new tokens over their sequences' paged KV; returns query's shape."""
    require_tensor("query", query, 3)
    kv.check_query(query)
    require_query_starts(query_start_loc, kv.batch_size)
    require_out(out, tuple(query.shape), query)
    scale = require_positive_scale(scale, kv.head_dim)
    lens = _lengths(kv)
    spans = _query_spans(query_start_loc, int(query.shape[0]), lens)
    if max_query_len is not None and max_query_len < max(e - s for s, e in spans):
        raise ValueError(f"max_query_len={max_query_len} is below the longest query span")
    ct = compute_dtype(query.dtype)
    result = torch.empty(query.shape, dtype=ct, device=query.device)
    for b, (s, e) in enumerate(spans):
        if e == s:
            continue
        keys, values = _gather_sequence(kv, b, lens[b], ct)
        result[s:e] = attend_sequence(query[s:e].to(ct), keys, values, scale)
    return _emit(result, query.dtype, out)
