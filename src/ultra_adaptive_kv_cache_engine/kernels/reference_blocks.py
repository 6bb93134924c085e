"""Plain-PyTorch block movement: writing new KV into slots, gathering and scattering whole blocks.

- `write_kv`: token i of `key`/`value` (num_tokens, kv_heads, head_dim) goes to slot ``slot_mapping[i]``,
  i.e. block ``slot // block_size`` at offset ``slot % block_size`` of one layer's caches. Slots must be
  distinct and in [0, num_blocks * block_size); the reference raises ValueError otherwise (the fast kernel
  skips out-of-range slots instead of writing out of bounds).
- `gather_blocks` / `scatter_blocks`: a block is one contiguous chunk ``pool[i]`` of a contiguous pool of
  shape (num_blocks, ...); gather copies ``pool[block_ids]`` into a contiguous staging tensor
  (len(block_ids), ...), scatter copies it back. Both are bit-exact copies. Block ids must be in range
  (checked here) and distinct for scatter.
- `seal_blocks`: quantize on write. Staging block ``staging_ids[i]`` (full precision, all layers, K and V)
  is quantized by a `PoolFormat` into pool block ``block_ids[i]`` of a quantized pool (uint8, (N, layers, 2,
  slab_bytes)); the staging blocks are left as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compression.pool_formats import PoolFormat
from .checks import INDEX_DTYPES, KV_DTYPES, require_dtype, require_like, require_shape, require_tensor


def check_write_inputs(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slots: Tensor) -> None:
    """Metadata checks of `write_kv`'s arguments."""
    require_tensor("key", key, 3)
    require_tensor("value", value, 3)
    require_tensor("key_cache", key_cache, 4)
    require_tensor("value_cache", value_cache, 4)
    require_tensor("slot_mapping", slots, 1)
    require_dtype("slot_mapping", slots, INDEX_DTYPES)
    require_like("value_cache", value_cache, "key_cache", key_cache)
    require_shape("value_cache", value_cache, tuple(key_cache.shape))
    expected = (int(slots.shape[0]), int(key_cache.shape[2]), int(key_cache.shape[3]))
    for name, tensor in (("key", key), ("value", value)):
        require_like(name, tensor, "key_cache", key_cache)
        require_shape(name, tensor, expected)
    require_like("slot_mapping", slots, "key_cache", key_cache, same_dtype=False)


def reference_write_kv(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write each token's K and V into its slot of one layer's caches (in place)."""
    check_write_inputs(key, value, key_cache, value_cache, slot_mapping)
    num_slots = key_cache.shape[0] * key_cache.shape[1]
    slots = slot_mapping.long()
    bad = (slots < 0) | (slots >= num_slots)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"slot_mapping[{i}]={int(slots[i])} is not a slot in [0, {num_slots})")
    if slots.unique().numel() != slots.numel():
        raise ValueError("slot_mapping holds a slot twice; expected distinct slots")
    blocks, offsets = slots // key_cache.shape[1], slots % key_cache.shape[1]
    key_cache[blocks, offsets] = key
    value_cache[blocks, offsets] = value


def check_block_ids(block_ids: Tensor, pool: Tensor) -> None:
    """Metadata checks of a block id list against a contiguous pool (num_blocks, ...)."""
    require_tensor("block_ids", block_ids, 1)
    require_dtype("block_ids", block_ids, INDEX_DTYPES)
    require_like("block_ids", block_ids, "pool", pool, same_dtype=False)
    if pool.dim() < 1 or not pool.is_contiguous():
        raise ValueError(f"pool must be a contiguous tensor (num_blocks, ...), got strides {pool.stride()}")


def check_staging(name: str, staging: Tensor, pool: Tensor, count: int) -> None:
    """ValueError unless `staging` is a contiguous (count, *pool.shape[1:]) tensor like `pool`."""
    require_like(name, staging, "pool", pool)
    require_shape(name, staging, (count, *pool.shape[1:]))
    if not staging.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {staging.stride()}")


def _require_ids_in_range(block_ids: Tensor, num_blocks: int, distinct: bool, name: str = "block_ids") -> None:
    bad = (block_ids < 0) | (block_ids >= num_blocks)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}]={int(block_ids[i])} is not a block id in [0, {num_blocks})")
    if distinct and block_ids.unique().numel() != block_ids.numel():
        raise ValueError("block_ids holds a block twice; expected distinct ids when scattering")


def reference_gather_blocks(pool: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """``pool[block_ids]`` as one contiguous tensor (written into `out` when given); returns it."""
    check_block_ids(block_ids, pool)
    if out is None:
        out = torch.empty((block_ids.shape[0], *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    check_staging("out", out, pool, int(block_ids.shape[0]))
    _require_ids_in_range(block_ids, pool.shape[0], distinct=False)
    torch.index_select(pool, 0, block_ids.long(), out=out)
    return out


def reference_scatter_blocks(staging: Tensor, pool: Tensor, block_ids: Tensor) -> None:
    """``pool[block_ids[i]] = staging[i]`` for every i (in place); ids must be distinct."""
    check_block_ids(block_ids, pool)
    check_staging("staging", staging, pool, int(block_ids.shape[0]))
    _require_ids_in_range(block_ids, pool.shape[0], distinct=True)
    pool.index_copy_(0, block_ids.long(), staging)


def check_seal_inputs(staging: Tensor, staging_ids: Tensor, pool: Tensor, block_ids: Tensor, format: PoolFormat) -> int:
    """Metadata checks of `seal_blocks`' arguments; returns the slab size."""
    if not isinstance(format, PoolFormat):
        raise TypeError(f"format={format!r} must be a PoolFormat")
    require_tensor("staging", staging, 6)
    require_dtype("staging", staging, KV_DTYPES)
    require_tensor("pool", pool, 4)
    require_dtype("pool", pool, (torch.uint8,))
    require_like("pool", pool, "staging", staging, same_dtype=False)
    for name, ids in (("staging_ids", staging_ids), ("block_ids", block_ids)):
        require_tensor(name, ids, 1)
        require_dtype(name, ids, INDEX_DTYPES)
        require_like(name, ids, "staging", staging, same_dtype=False)
    if staging_ids.shape != block_ids.shape:
        raise ValueError(f"staging_ids has {staging_ids.shape[0]} ids but block_ids has {block_ids.shape[0]}")
    layers, _, bs, heads, dim = (int(d) for d in staging.shape[1:])
    slab = format.slab_bytes(bs, heads, dim)
    require_shape("pool", pool, (int(pool.shape[0]), layers, 2, slab))
    if not pool.is_contiguous() or not staging.is_contiguous():
        raise ValueError("pool and staging must be contiguous")
    return slab


def reference_seal_blocks(staging: Tensor, staging_ids: Tensor, pool: Tensor, block_ids: Tensor,
                          format: PoolFormat) -> None:
    """Quantize staging[staging_ids[i]] (layers, 2, bs, heads, head_dim) into pool[block_ids[i]] (in place)."""
    slab = check_seal_inputs(staging, staging_ids, pool, block_ids, format)
    _require_ids_in_range(staging_ids.long(), staging.shape[0], distinct=False, name="staging_ids")
    _require_ids_in_range(block_ids.long(), pool.shape[0], distinct=True)
    n = int(block_ids.shape[0])
    if n == 0:
        return
    layers, _, bs, heads, dim = (int(d) for d in staging.shape[1:])
    blocks = staging.index_select(0, staging_ids.long())  # (n, L, 2, bs, H, D)
    keys = format.quantize(blocks[:, :, 0].reshape(n * layers, bs, heads, dim), True).view(n, layers, slab)
    values = format.quantize(blocks[:, :, 1].reshape(n * layers, bs, heads, dim), False).view(n, layers, slab)
    pool.index_copy_(0, block_ids.long(), torch.stack([keys, values], dim=2))
