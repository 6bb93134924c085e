"""Records <-> batches of blocks: decode many records into one host buffer, or straight into a pool's slots.

Moving blocks between an accelerator pool and host memory is `kernels.BlockTransfer`'s job (one gather plus one
copy through pinned staging). This module is the tier side of that seam: `records_to_host` decodes n records
into ONE (n, *block_shape) host tensor (page-locked when the pool is on CUDA) ready for a single host-to-device
copy, and `load_records` does the whole load for a pool (on CPU it decodes straight into the pool's slots).
`load_blocks` goes one step further: it asks a tier to land each block where it belongs (`Tier.get_many_into`),
so a disk tier reads block files straight into the pool's slots (CPU) or into one page-locked staging buffer
(CUDA), with no per-block buffer in between.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Tier
from .record import BlockRecord


def _check(records: Sequence[BlockRecord], block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    for record in records:
        if record.meta.shape != block_shape or record.meta.torch_dtype != dtype:
            raise ValueError(
                f"block {record.block_hash.hex()[:16]} is {record.meta.dtype} {record.meta.shape}; "
                f"the pool holds {dtype} {block_shape}"
            )


def _index(block_ids: Sequence[int], pool: torch.Tensor) -> torch.Tensor:
    ids = [int(b) for b in block_ids]
    bad = [b for b in ids if not 0 <= b < pool.shape[0]]
    if bad:
        raise ValueError(f"block ids {bad[:8]} are out of range for a pool of {pool.shape[0]} blocks")
    if len(set(ids)) != len(ids):
        raise ValueError(f"block ids {ids[:16]} repeat a slot; each block needs its own")
    return torch.tensor(ids, dtype=torch.long, device=pool.device)


def records_to_host(
    records: Sequence[BlockRecord], block_shape: Sequence[int], dtype: torch.dtype, pin_memory: bool = False
) -> torch.Tensor:
    """A fresh host tensor (n, *block_shape) with record i decoded into row i (one decode copy per block).

    ValueError if a record is not a block of that shape and dtype; CorruptBlockError if a payload is bad.
    """
    shape = tuple(int(d) for d in block_shape)
    _check(records, shape, dtype)
    host = torch.empty((len(records), *shape), dtype=dtype, pin_memory=pin_memory)
    for i, record in enumerate(records):
        record.tensor(out=host[i])
    return host


def load_records(pool: torch.Tensor, block_ids: Sequence[int], records: Sequence[BlockRecord]) -> None:
    """Decode `records` into pool[block_ids] (block-major pool: pool[i] is one block).

    On CPU each record is decoded straight into its slot; on CUDA all are decoded into one pinned buffer,
    then one host-to-device copy and one index_copy_. Everything is validated before the pool is touched.
    """
    if len(records) != len(block_ids):
        raise ValueError(f"{len(records)} records for {len(block_ids)} block ids")
    block_shape = tuple(pool.shape[1:])
    _check(records, block_shape, pool.dtype)
    index = _index(block_ids, pool)
    if pool.device.type == "cpu":
        for block_id, record in zip(block_ids, records, strict=True):
            record.tensor(out=pool[int(block_id)])
        return
    host = records_to_host(records, block_shape, pool.dtype, pin_memory=True)
    pool.index_copy_(0, index, host.to(pool.device, non_blocking=True))


def load_blocks(tier: Tier, keys: Sequence[bytes], pool: torch.Tensor, block_ids: Sequence[int]) -> list[bool]:
    """Load the blocks of `keys` from `tier` into pool[block_ids] (block-major pool); True where a block was loaded.

    On CPU each block lands straight in its slot; on CUDA all land in one page-locked staging buffer, then one
    host-to-device copy and one index_copy_ of the loaded rows. A slot whose block was missed holds unspecified
    bytes (compute it instead). ValueError for unequal lengths, out-of-range or repeated block ids (checked before
    any read), or a stored block that is not of the pool's block shape and dtype.
    """
    if len(keys) != len(block_ids):
        raise ValueError(f"{len(keys)} keys for {len(block_ids)} block ids")
    index = _index(block_ids, pool)
    if pool.device.type == "cpu":
        return tier.get_many_into(keys, [pool[int(b)] for b in block_ids])
    host = torch.empty((len(keys), *pool.shape[1:]), dtype=pool.dtype, pin_memory=True)
    hits = tier.get_many_into(keys, list(host))
    if all(hits):
        pool.index_copy_(0, index, host.to(pool.device, non_blocking=True))
    elif any(hits):
        rows = torch.tensor([i for i, hit in enumerate(hits) if hit], dtype=torch.long, device=pool.device)
        pool.index_copy_(0, index[rows], host.to(pool.device, non_blocking=True)[rows])
    return hits
