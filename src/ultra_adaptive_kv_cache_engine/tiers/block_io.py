"""Records <-> batches of blocks: decode many records into one host buffer, or straight into a pool's slots.

Moving blocks between an accelerator pool and host memory is `kernels.BlockTransfer`'s job (one gather plus one
copy through pinned staging). This module is the tier side of that seam: `records_to_host` decodes n records
into ONE (n, *block_shape) host tensor (page-locked when the pool is on CUDA) ready for a single host-to-device
copy, and `load_records` does the whole load for a pool: on CPU it decodes straight into the pool's slots; on
CUDA a record whose payload is already a block's raw bytes in page-locked memory (an identity-coded record of a
pinning CPU tier: `pinned_payload`) is DMA'd straight from there into its slot (`kernels.copy_host_blocks`),
and only the others are decoded into a pinned buffer first.
`load_blocks` goes one step further: it asks a tier to land each block where it belongs (`Tier.get_many_into`),
so a disk tier reads block files straight into the pool's slots (CPU) or into one page-locked staging buffer
(CUDA), with no per-block buffer in between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.pinned_hold import PinnedHold
from ..kernels.transfer import copy_host_blocks
from ..types import CodecKind
from .base import Tier
from .record import BlockRecord


def _check(records: Sequence[BlockRecord], block_shape: tuple[int, ...], dtype: torch.dtype) -> None:
    for record in records:
        if record.meta.shape != block_shape or record.meta.torch_dtype != dtype:
            raise ValueError(
                f"block {record.block_hash.hex()[:16]} is {record.meta.dtype} {record.meta.shape}; "
                f"the pool holds {dtype} {block_shape}"
            )


def _ids(block_ids: Sequence[int], pool: torch.Tensor) -> list[int]:
    ids = [int(b) for b in block_ids]
    bad = [b for b in ids if not 0 <= b < pool.shape[0]]
    if bad:
        raise ValueError(f"block ids {bad[:8]} are out of range for a pool of {pool.shape[0]} blocks")
    if len(set(ids)) != len(ids):
        raise ValueError(f"block ids {ids[:16]} repeat a slot; each block needs its own")
    return ids


def _index(block_ids: Sequence[int], pool: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_ids(block_ids, pool), dtype=torch.long, device=pool.device)


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


@dataclass(frozen=True)
class LoadResult:
    """How `load_records` moved its blocks: `direct` copied from their page-locked payloads straight into their
    slots, `decoded` decoded on the host first (into the slots on CPU, into a pinned buffer on CUDA)."""

    direct: int = 0
    decoded: int = 0


DIRECT_CHUNK = 8
"""Direct copies are issued in runs of this many blocks: the first DMA starts after eight payloads are checked,
not after all of them (a 16k-token prefix of a Llama-3-8B shape is 255 blocks of 8 MiB; looking at them all
first delayed the first copy by milliseconds)."""


def pinned_payload(record: BlockRecord) -> torch.Tensor | None:
    """`record`'s payload as a uint8 tensor aliasing it, if it is identity-coded and page-locked (what a CUDA
    copy can DMA as it is); None otherwise (always None without CUDA: nothing is page-locked there)."""
    if record.meta.codec is not CodecKind.IDENTITY:
        return None
    payload = record.payload_tensor()
    return payload if payload.is_pinned() else None


def load_records(pool: torch.Tensor, block_ids: Sequence[int], records: Sequence[BlockRecord],
                 hold: PinnedHold | None = None) -> LoadResult:
    """Put `records` into pool[block_ids] (block-major pool: pool[i] is one block); says how (`LoadResult`).

    On CPU each record is decoded straight into its slot. On CUDA (contiguous pool) each identity-coded record
    with a page-locked payload is copied straight from it into its slot, one asynchronous copy per block on a
    side stream (`kernels.copy_host_blocks`, in runs of `DIRECT_CHUNK` blocks, each issued as soon as its
    payloads are checked) that the current stream then waits for on the device (no host
    sync: the host goes on queueing the prefill while the copies run; PyTorch's pinned-memory allocator keeps
    the payloads' memory from reuse until the copies are done); the others are decoded into one pinned buffer,
    then one host-to-device copy and one index_copy_ queued on the current stream. Either way the records may
    be dropped as soon as it returns, and later work on the current stream sees every block.
    With `hold` (CUDA), the page-locked payloads are instead read by ONE kernel per call straight from host
    memory (`kernels.triton_host_copy.gather_host_blocks`, on the current stream, no per-block `copy_`), and
    `hold` keeps them alive until the device has passed that kernel.
    Everything is validated before the pool is touched.
    """
    if len(records) != len(block_ids):
        raise ValueError(f"{len(records)} records for {len(block_ids)} block ids")
    block_shape = tuple(pool.shape[1:])
    _check(records, block_shape, pool.dtype)
    ids = _ids(block_ids, pool)
    if pool.device.type == "cpu":
        for block_id, record in zip(ids, records, strict=True):
            record.tensor(out=pool[block_id])
        return LoadResult(decoded=len(records))
    rest: list[int] = []
    direct = 0
    contiguous = pool.is_contiguous()
    if hold is not None and contiguous:
        direct, rest = _mapped_reads(pool, ids, records, hold)
    for start in range(0, len(records) if hold is None or not contiguous else 0, DIRECT_CHUNK):  # the first DMAs start while later payloads are looked at
        chunk = range(start, min(start + DIRECT_CHUNK, len(records)))
        sources = [(ids[i], pinned_payload(records[i]) if contiguous else None) for i in chunk]
        rest += [i for i, (_, src) in zip(chunk, sources, strict=True) if src is None]
        pinned = [(block_id, src) for block_id, src in sources if src is not None]
        if pinned:  # on a side stream after the current stream's work; the current stream waits for them
            copy_host_blocks(pool, [src for _, src in pinned], [block_id for block_id, _ in pinned], wait=False)
            direct += len(pinned)
    if rest:
        host = records_to_host([records[i] for i in rest], block_shape, pool.dtype, pin_memory=True)
        index = torch.tensor([ids[i] for i in rest], dtype=torch.long).to(pool.device, non_blocking=True)
        pool.index_copy_(0, index, host.to(pool.device, non_blocking=True))
    return LoadResult(direct=direct, decoded=len(rest))


def _mapped_reads(pool: torch.Tensor, ids: list[int], records: Sequence[BlockRecord],
                  hold: PinnedHold) -> tuple[int, list[int]]:
    """The page-locked, 16-byte aligned payloads of `records` read into their slots by one kernel (held by
    `hold`); returns (how many, the indices of the records left for decoding)."""
    from ..kernels.triton_host_copy import WORD, gather_host_blocks

    rows = pool.view(pool.shape[0], -1).view(torch.uint8)
    sources = [pinned_payload(r) for r in records]
    take = [i for i, src in enumerate(sources)
            if src is not None and src.numel() == rows.shape[1] and src.data_ptr() % WORD == 0]
    if take and rows.shape[1] % WORD == 0:
        gather_host_blocks(rows, [sources[i].data_ptr() for i in take], [ids[i] for i in take])  # type: ignore[union-attr]
        hold.hold([sources[i] for i in take], pool.device)  # type: ignore[misc]
    else:
        take = []
    chosen = set(take)
    return len(take), [i for i in range(len(records)) if i not in chosen]


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
