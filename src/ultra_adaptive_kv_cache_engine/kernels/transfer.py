"""`BlockTransfer`: scattered blocks of a block-major pool to and from host memory, in one large copy each way.

In the block-major layout a block (all layers, K and V) is one contiguous chunk ``pool[i]``, so moving n
scattered blocks costs one gather plus one copy: device -> host gathers the blocks on the device into a
contiguous staging buffer, then copies it with one non_blocking copy into pinned host memory; host ->
device copies into the staging buffer with one copy, then scatters. Per-block copies would instead pay a
launch and a PCIe round trip each. Batches larger than `max_blocks` go in chunks of `max_blocks`.
The exception is host blocks that already live apart, each in its own page-locked buffer (a CPU tier's
payloads): `copy_host_blocks` DMAs each one straight into its pool block, since a host-side gather would be
a full extra pass over the bytes.

Invariants: the staging buffer (`max_blocks` blocks on the pool's device, CUDA only) is owned by this object
and reused; work is queued on the current CUDA stream (per-block host copies on a side stream ordered after
it, see `copy_host_blocks`), so successive calls are ordered; with
``wait=True`` (the default) a call returns only when its copies are complete, so the host tensor may be read
(to_host) or reused (from_host) at once; with ``wait=False`` call `synchronize()` first. Not thread-safe: one
transfer object per thread or stream. On a CPU pool no staging is used (a gather or scatter is the copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .registry import KernelBackend, select_backend


class BlockTransfer:
    """Moves scattered blocks of one pool between its device and (pinned) host memory."""

    def __init__(self, pool: Tensor, max_blocks: int, backend: KernelBackend | None = None) -> None:
        if not isinstance(pool, Tensor) or pool.dim() < 2 or not pool.is_contiguous():
            raise ValueError("pool must be a contiguous tensor (num_blocks, ...) with at least 2 dimensions")
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks!r} must be a positive int")
        self.pool = pool
        self.max_blocks = max_blocks
        self.backend = backend if backend is not None else select_backend(pool.device)
        self._on_cuda = pool.device.type == "cuda"
        self._staging: Tensor | None = None

    @property
    def block_shape(self) -> tuple[int, ...]:
        return tuple(self.pool.shape[1:])

    def host_buffer(self, num_blocks: int) -> Tensor:
        """A new host tensor for `num_blocks` blocks, pinned when the pool is on CUDA."""
        return torch.empty((num_blocks, *self.block_shape), dtype=self.pool.dtype, pin_memory=self._on_cuda)

    def _ids(self, block_ids: Sequence[int] | Tensor) -> Tensor:
        if isinstance(block_ids, Tensor):
            if block_ids.dim() != 1 or block_ids.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"block_ids must be a 1-D int32/int64 tensor, got {block_ids.dtype} {tuple(block_ids.shape)}")
            return block_ids.to(self.pool.device, non_blocking=True)
        return torch.tensor(list(block_ids), dtype=torch.int64).to(self.pool.device, non_blocking=True)

    def _staging_for(self, count: int) -> Tensor:
        if self._staging is None:
            self._staging = torch.empty((self.max_blocks, *self.block_shape), dtype=self.pool.dtype, device=self.pool.device)
        return self._staging[:count]

    def _check_host(self, host: Tensor, count: int) -> None:
        if not isinstance(host, Tensor) or host.device.type != "cpu" or not host.is_contiguous():
            raise ValueError("the host tensor must be a contiguous CPU tensor")
        if host.dtype != self.pool.dtype or tuple(host.shape) != (count, *self.block_shape):
            raise ValueError(
                f"the host tensor is {host.dtype} {tuple(host.shape)}; expected {self.pool.dtype} "
                f"{(count, *self.block_shape)}"
            )

    def to_host(self, block_ids: Sequence[int] | Tensor, out: Tensor | None = None, wait: bool = True) -> Tensor:
        """The blocks `block_ids` copied into `out` (or a new pinned host tensor) in that order; returns it."""
        ids = self._ids(block_ids)
        count = int(ids.shape[0])
        out = self.host_buffer(count) if out is None else out
        self._check_host(out, count)
        if not self._on_cuda:
            self.backend.gather_blocks(self.pool, ids, out)
            return out
        for start in range(0, count, self.max_blocks):
            stop = min(count, start + self.max_blocks)
            staging = self.backend.gather_blocks(self.pool, ids[start:stop], self._staging_for(stop - start))
            out[start:stop].copy_(staging, non_blocking=True)
        if wait:
            self.synchronize()
        return out

    def from_host(self, host: Tensor, block_ids: Sequence[int] | Tensor, wait: bool = True) -> None:
        """Write ``host[i]`` into block ``block_ids[i]`` of the pool; ids must be distinct."""
        ids = self._ids(block_ids)
        count = int(ids.shape[0])
        self._check_host(host, count)
        if not self._on_cuda:
            self.backend.scatter_blocks(host, self.pool, ids)
            return
        for start in range(0, count, self.max_blocks):
            stop = min(count, start + self.max_blocks)
            staging = self._staging_for(stop - start)
            staging.copy_(host[start:stop], non_blocking=True)
            self.backend.scatter_blocks(staging, self.pool, ids[start:stop])
        if wait:
            self.synchronize()

    def from_host_blocks(self, blocks: Sequence[Tensor], block_ids: Sequence[int], wait: bool = True) -> None:
        """Copy ``blocks[i]`` (a contiguous host tensor holding exactly one block's bytes, of any dtype: e.g. a
        tier's raw payload) into block ``block_ids[i]``: `copy_host_blocks` (one direct copy per block on a side
        stream, no staging). With ``wait=False`` the copies are only ordered before later work on the current
        stream; call `synchronize()` before the host tensors change."""
        copy_host_blocks(self.pool, blocks, block_ids, wait=wait)

    def synchronize(self) -> None:
        """Wait until every copy queued so far on the current stream is complete."""
        if self._on_cuda:
            torch.cuda.current_stream(self.pool.device).synchronize()


def _byte_rows(pool: Tensor, blocks: Sequence[Tensor], block_ids: Sequence[int]) -> tuple[Tensor, list[Tensor], list[int]]:
    """The pool as (num_blocks, block bytes) uint8 rows, the host blocks as flat uint8 views, the ids as ints;
    ValueError naming the first bad argument (nothing is copied before all are checked)."""
    if not isinstance(pool, Tensor) or pool.dim() < 2 or not pool.is_contiguous():
        raise ValueError("pool must be a contiguous tensor (num_blocks, ...) with at least 2 dimensions")
    ids = [int(b) for b in block_ids]
    if len(ids) != len(blocks):
        raise ValueError(f"{len(blocks)} host blocks for {len(ids)} block ids")
    bad = [b for b in ids if not 0 <= b < pool.shape[0]]
    if bad:
        raise ValueError(f"block ids {bad[:8]} are out of range for a pool of {pool.shape[0]} blocks")
    rows = pool.view(pool.shape[0], -1).view(torch.uint8)
    nbytes = rows.shape[1]
    raw: list[Tensor] = []
    for i, block in enumerate(blocks):
        if not isinstance(block, Tensor) or block.device.type != "cpu" or not block.is_contiguous():
            raise ValueError(f"blocks[{i}] must be a contiguous CPU tensor")
        if block.numel() * block.element_size() != nbytes:
            raise ValueError(f"blocks[{i}] holds {block.numel() * block.element_size()} bytes; a block is {nbytes}")
        raw.append(block.reshape(-1).view(torch.uint8))
    return rows, raw, ids


def copy_host_blocks(pool: Tensor, blocks: Sequence[Tensor], block_ids: Sequence[int], wait: bool = True) -> None:
    """Copy host block ``blocks[i]`` (contiguous, exactly one block's bytes, any dtype) into ``pool[block_ids[i]]``,
    one direct copy per block with no host-side gather and no device staging.

    On CUDA the copies run on a side stream that first waits for the work already queued on the current stream
    (which may still read the destination slots); from page-locked host memory they are asynchronous DMAs
    queued back to back (from pageable memory the driver stages each one: correct, slower). One event marks
    their end: with ``wait=True`` the call returns when it has completed, so the host blocks may change or be
    freed at once; with ``wait=False`` the current stream waits for the event (later work on it sees the
    blocks) and the host blocks must stay unchanged until the current stream is synchronised. On a CPU pool
    the copies are plain copies. Repeated ids: the last block wins.
    """
    rows, raw, ids = _byte_rows(pool, blocks, block_ids)
    if pool.device.type != "cuda":
        for block_id, src in zip(ids, raw, strict=True):
            rows[block_id].copy_(src)
        return
    current = torch.cuda.current_stream(pool.device)
    side = torch.cuda.Stream(pool.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        for block_id, src in zip(ids, raw, strict=True):
            rows[block_id].copy_(src, non_blocking=True)
        done = side.record_event()
    if wait:
        done.synchronize()
    else:
        current.wait_event(done)
