"""`StagingBlocks`: the full-precision blocks of a quantized pool's sequences that are not sealed yet.

A quantized pool (`KVSpec.pool_format`) holds only SEALED blocks: full blocks quantized with the pool format.
Every token whose block is not full yet (a sequence's partial last block, the KIVI full-precision window, and the
blocks a step fills) lives in a staging block: a (num_layers, 2, block_size, heads, head_dim) block in the model's
dtype, in one staging tensor (num_staging, ...) owned here, outside the pool's budget.

Per sequence: its first `sealed` logical blocks hold their quantized bytes in the pool (cached prefix hits come
back sealed); from logical block `base` (<= sealed) on, the blocks are read from staging blocks `ids` (in order).
`stage(seq, end)` gives every block up to token `end` a staging block (before a step writes them); `seal(...)`
quantizes every staged block that is full now into the sequence's pool block (`KernelBackend.seal_blocks`, one
call per step), so a block is sealed exactly once, before anything names it (the commit and the write-back name
sealed blocks only). The RESIDUAL WINDOW (`residual` tokens, `KVCacheConfig.kv_residual_tokens`, KIVI's
full-precision window): a sealed block keeps its staging block, and the sequence keeps reading it in full
precision, until it lies entirely before the sequence's last `residual` tokens; then its staging block is freed
and the row names the pool block. With `residual` 0 a block is read from the pool as soon as it is sealed.
`row(seq, table)` is the kernel's block-table row: pool ids for blocks before `base`, ``N + staging id`` for the
others (N = pool blocks; see `kernels.PagedKV`).

The staging tensor starts with `capacity` blocks and doubles when a step needs more (`generation` counts the
growths: a captured CUDA graph holds the old tensor's address and must be dropped). Not thread-safe: the
backend's step thread owns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..kernels import KernelBackend
from ..memory import KVSpec
from ..model.kv_views import QuantPool


@dataclass
class _Staged:
    sealed: int  # leading logical blocks whose quantized bytes are in the pool
    base: int  # leading logical blocks read from the pool (<= sealed)
    ids: list[int] = field(default_factory=list)  # staging blocks of logical blocks base, base + 1, ...
    version: int = 0  # bumped whenever the kernel row changes


class StagingBlocks:
    """Staging blocks of the sequences of one quantized pool (see the module docstring)."""

    def __init__(self, spec: KVSpec, pool: torch.Tensor, kernels: KernelBackend, capacity: int,
                 residual: int = 0) -> None:
        fmt = spec.quant_format
        if fmt is None:
            raise ValueError("staging blocks serve a quantized pool; spec.pool_format is None")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be a positive int")
        if isinstance(residual, bool) or not isinstance(residual, int) or residual < 0:
            raise ValueError(f"residual={residual!r} must be a non-negative int (tokens)")
        self.spec, self.kernels, self.residual = spec, kernels, residual
        self.block_size = spec.block_size
        self.generation = 0
        self._pool = pool
        self.pools = QuantPool(pool, self._empty(capacity), fmt)
        self._free = list(range(capacity - 1, -1, -1))  # pop() takes the lowest id first
        self._seqs: dict[int, _Staged] = {}
        self._pads: list[int] = []

    def _empty(self, count: int) -> torch.Tensor:
        return torch.zeros((count, *self.spec.staging_block_shape), dtype=self.spec.dtype, device=self.spec.device)

    @property
    def capacity(self) -> int:
        return int(self.pools.staging.shape[0])

    @property
    def num_free(self) -> int:
        return len(self._free)

    # -- sequences ------------------------------------------------------------------------------------------
    def open(self, seq_id: int, sealed_blocks: int) -> None:
        """A sequence whose first `sealed_blocks` blocks are in the pool (its cached prefix)."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already open in the staging blocks")
        self._seqs[seq_id] = _Staged(sealed_blocks, sealed_blocks)

    def close(self, seq_id: int) -> None:
        """Frees the sequence's staging blocks (its partial tail is dropped)."""
        staged = self._seqs.pop(seq_id, None)
        if staged is not None:
            self._free.extend(reversed(staged.ids))

    def sealed_blocks(self, seq_id: int) -> int:
        return self._seqs[seq_id].sealed

    def pool_blocks(self, seq_id: int) -> int:
        """Leading blocks of the sequence read from the pool (the others from staging blocks)."""
        return self._seqs[seq_id].base

    def version(self, seq_id: int) -> int:
        return self._seqs[seq_id].version

    def stage(self, seq_id: int, end: int) -> None:
        """Gives every block of the sequence up to token `end` (exclusive) that is not sealed a staging block."""
        staged = self._seqs[seq_id]
        missing = -(-end // self.block_size) - staged.base - len(staged.ids)
        if missing > 0:
            staged.ids += self._take(missing)
            staged.version += 1

    def row(self, seq_id: int, table: Sequence[int]) -> list[int]:
        """The sequence's kernel block-table row over its pool block table `table`."""
        staged = self._seqs[seq_id]
        n, b = self.pools.num_sealed, staged.base
        return [*table[:b], *(n + i for i in staged.ids), *table[b + len(staged.ids) :]]

    def seal(self, done: Sequence[tuple[int, int, Sequence[int]]]) -> int:
        """Seals, for each (seq_id, tokens with KV, pool block table), every staged block that is full now into
        its pool block, in one `seal_blocks` call; then frees the staging blocks of the sealed blocks that lie
        entirely before the sequence's last `residual` tokens. Returns how many blocks were sealed."""
        sources: list[int] = []
        targets: list[int] = []
        released: list[int] = []
        for seq_id, computed, table in done:
            staged = self._seqs[seq_id]
            full = min(computed // self.block_size, staged.base + len(staged.ids)) - staged.sealed
            if full > 0:
                first = staged.sealed - staged.base
                sources += staged.ids[first : first + full]
                targets += table[staged.sealed : staged.sealed + full]
                staged.sealed += full
            old = min(staged.sealed, max(computed - self.residual, 0) // self.block_size) - staged.base
            if old > 0:
                released += staged.ids[:old]
                del staged.ids[:old]
                staged.base += old
                staged.version += 1
        if sources:
            device = self.spec.device
            src = torch.tensor(sources, dtype=torch.int64).to(device, non_blocking=True)
            dst = torch.tensor(targets, dtype=torch.int64).to(device, non_blocking=True)
            self.kernels.seal_blocks(self.pools.staging, src, self._pool, dst, self.pools.format)
        self._free.extend(reversed(released))
        return len(sources)

    # -- padding rows of batched decode ---------------------------------------------------------------------
    def pad_blocks(self, count: int) -> list[int]:
        """Table entries (``N + id``) of staging blocks holding `count` padding rows; kept until `free_pads`."""
        missing = -(-count // self.block_size) - len(self._pads)
        if missing > 0:
            self._pads += self._take(missing)
        return [self.pools.num_sealed + i for i in self._pads]

    def free_pads(self) -> None:
        self._free.extend(reversed(self._pads))
        self._pads = []

    # -- the staging tensor -----------------------------------------------------------------------------------
    def _take(self, count: int) -> list[int]:
        while len(self._free) < count:
            self._grow()
        return [self._free.pop() for _ in range(count)]

    def _grow(self) -> None:
        old = self.pools.staging
        size = int(old.shape[0])
        staging = self._empty(2 * size)
        staging[:size] = old
        self.pools = QuantPool(self._pool, staging, self.pools.format)
        self._free = list(range(2 * size - 1, size - 1, -1)) + self._free
        self.generation += 1
