"""The frozen results the cache manager returns at its seam with the engine and the model adapters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a token sequence, in full blocks: ``num_tokens == len(block_ids) * B``."""

    block_ids: tuple[int, ...]
    hashes: tuple[bytes, ...]
    num_tokens: int


@dataclass(frozen=True)
class SequenceHits:
    """Where a sequence's reused prefix came from: `pool_tokens` were in the pool, `tier_tokens` were promoted
    from the tiers below it (both multiples of the block size); `tiers` names where each reused block was,
    in prefix order ("pool", a tier's name, or "lower" when the tier was not located)."""

    pool_tokens: int
    tier_tokens: int
    tiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class HeldBlocks:
    """What a cache manager can serve without a shared tier, at one moment: the names (full 32-byte block hashes)
    in its pool's index (`pool`) and in the local tiers below the pool (`local_tiers`: memory and disk, never a
    shared tier such as Redis; a block may be in both), with the pool's occupancy then (`num_blocks`,
    `free_blocks`: free or cached-and-free, `sequences`: live sequences)."""

    pool: tuple[bytes, ...]
    local_tiers: tuple[bytes, ...]
    num_blocks: int
    free_blocks: int
    sequences: int
