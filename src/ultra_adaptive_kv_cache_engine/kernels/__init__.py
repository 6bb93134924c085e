"""Kernels (layer L2): paged attention and block movement, each a plain-PyTorch reference plus a Triton twin.

Layout: the KV pool is block-major, (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim); a layer's
view is `PagedKV.from_pool(pool, layer, block_tables, seq_lens)` (keys ``pool[:, layer, 0]``, values
``pool[:, layer, 1]``). Pick an implementation with `select_backend(device)` (Triton on CUDA, the reference
elsewhere) or `get_backend(name)`; each `KernelBackend` offers:

- ``decode_attention(query, kv)``: one new token per sequence, query (batch, q_heads, head_dim), GQA; the
  Triton kernel is split-K (flash-decoding) so small batches with long contexts still fill the GPU.
- ``prefill_attention(query, query_start_loc, kv)``: packed new tokens (total_q, q_heads, head_dim) over a
  cached paged prefix, causal over the new tokens (their KV written first with ``write_kv``).
- ``write_kv(key, value, key_cache, value_cache, slot_mapping)``: new K/V into their slots.
- ``gather_blocks(pool, ids, out)`` / ``scatter_blocks(staging, pool, ids)``: whole blocks to and from a
  contiguous staging tensor; `BlockTransfer` builds device <-> pinned host moves of scattered blocks on them,
  one large copy each way.
- ``seal_blocks(staging, staging_ids, pool, block_ids, format)``: quantize on write into a quantized pool, whose
  view is `PagedKV.from_pools(pool, staging, layer, ...)` (`QuantBlocks`: sealed slabs, and staging blocks
  for the tokens of unsealed blocks).

The Triton modules (``triton_*.py``) import triton at import time and are imported only by the registry's
"triton" factory, so this package imports and runs without triton. Tests compare both twins with a float64
oracle; `launch_plan` holds the shape heuristics (tile sizes, split counts, warps).
"""

from __future__ import annotations

from .launch_plan import DecodeLaunch, DecodeShape, PrefillLaunch, plan_decode, plan_prefill
from .paged_kv import PagedKV, QuantBlocks
from .reference_attention import reference_decode_attention, reference_prefill_attention
from .reference_blocks import (
    reference_gather_blocks,
    reference_scatter_blocks,
    reference_seal_blocks,
    reference_write_kv,
)
from .registry import (
    BACKENDS,
    KernelBackend,
    get_backend,
    register_backend,
    select_backend,
    triton_available,
)
from .transfer import BlockTransfer

__all__ = [
    "BACKENDS",
    "BlockTransfer",
    "DecodeLaunch",
    "DecodeShape",
    "KernelBackend",
    "PagedKV",
    "PrefillLaunch",
    "QuantBlocks",
    "get_backend",
    "plan_decode",
    "plan_prefill",
    "reference_decode_attention",
    "reference_gather_blocks",
    "reference_prefill_attention",
    "reference_scatter_blocks",
    "reference_seal_blocks",
    "reference_write_kv",
    "register_backend",
    "select_backend",
    "triton_available",
]
