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
