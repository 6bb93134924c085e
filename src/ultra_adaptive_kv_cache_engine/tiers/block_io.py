"""Batched block copies between a paged KV pool and host memory: one large copy, never one per block.

The pool is block-major, so `pool[i]` (all layers, K and V of block i) is one contiguous chunk. Moving n
blocks costs one gather on the pool's device, one copy through a staging buffer (page-locked on CUDA, so the
copy is a DMA at full bus speed) and nothing per block but a slice. On a CPU pool the staging step is skipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .record import BlockRecord


def _index(block_ids: Sequence[int], pool: torch.Tensor) -> torch.Tensor:
    ids = [int(b) for b in block_ids]
    bad = [b for b in ids if not 0 <= b < pool.shape[0]]
    if bad:
        raise ValueError(f"block ids {bad[:8]} are out of range for a pool of {pool.shape[0]} blocks")
    return torch.tensor(ids, dtype=torch.long, device=pool.device)


def staging_buffer(shape: Sequence[int], dtype: torch.dtype, for_device: torch.device) -> torch.Tensor:
    """An empty host tensor, page-locked when the other side of the copy is a CUDA device."""
    return torch.empty(tuple(shape), dtype=dtype, pin_memory=for_device.type == "cuda")


def gather_blocks(pool: torch.Tensor, block_ids: Sequence[int]) -> torch.Tensor:
    """A fresh CPU tensor (n, *pool.shape[1:]) holding pool[block_ids]: one gather and one device-to-host copy."""
    gathered = pool.index_select(0, _index(block_ids, pool))
    if pool.device.type == "cpu":
        return gathered  # index_select already made a fresh copy
    host = staging_buffer(gathered.shape, gathered.dtype, pool.device)
    host.copy_(gathered)
    return host


def scatter_blocks(pool: torch.Tensor, block_ids: Sequence[int], blocks: torch.Tensor) -> None:
    """pool[block_ids[i]] = blocks[i] for a host tensor `blocks` (n, *pool.shape[1:]): one copy, one index_copy_."""
    expected = (len(block_ids), *pool.shape[1:])
    if tuple(blocks.shape) != expected or blocks.dtype != pool.dtype:
        raise ValueError(f"blocks {tuple(blocks.shape)} {blocks.dtype} do not match {expected} {pool.dtype}")
    src = blocks.to(pool.device, non_blocking=blocks.is_pinned()) if blocks.device != pool.device else blocks
    pool.index_copy_(0, _index(block_ids, pool), src)


def load_records(pool: torch.Tensor, block_ids: Sequence[int], records: Sequence[BlockRecord]) -> None:
    """Decode `records` into pool[block_ids]: straight into the pool on CPU, else through one staging copy.

    Raises ValueError if a record's dtype or shape is not the pool's block, CorruptBlockError if a payload does
    not decode; nothing is written to the pool in either case on CUDA (all decoding happens before the copy).
    """
    if len(records) != len(block_ids):
        raise ValueError(f"{len(records)} records for {len(block_ids)} block ids")
    block_shape = tuple(pool.shape[1:])
    for record in records:
        if record.meta.shape != block_shape or record.meta.torch_dtype != pool.dtype:
            raise ValueError(
                f"block {record.block_hash.hex()[:16]} is {record.meta.dtype} {record.meta.shape}; "
                f"the pool holds {pool.dtype} {block_shape}"
            )
    if pool.device.type == "cpu":
        _index(block_ids, pool)
        for block_id, record in zip(block_ids, records, strict=True):
            record.tensor(out=pool[int(block_id)])
        return
    staging = staging_buffer((len(records), *block_shape), pool.dtype, pool.device)
    for i, record in enumerate(records):
        record.tensor(out=staging[i])
    scatter_blocks(pool, block_ids, staging)
