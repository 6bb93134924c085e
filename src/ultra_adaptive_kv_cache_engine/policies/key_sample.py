"""Spatial sampling of keys (SHARDS): a stable hash picks the same 1/R of the key space in every process.

Why: a shadow cache only has to rank policies, and a shadow fed the keys of a fixed 1/R of the key space,
at 1/R of the capacity, hits in about the same proportion as a full one (Waldspurger et al., FAST'15), at
1/R of the cost. The hash must be deterministic across processes and machines (never Python's `hash()`,
which is salted per process): ints (trace block ids) go through the SplitMix64 finaliser, bytes (block
digests) and str through CRC-32 of their bytes, anything else through CRC-32 of its repr.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable

MASK64 = (1 << 64) - 1


def stable_key_hash(key: Hashable) -> int:
    """A non-negative hash of `key`, equal in every process; its low bits are well mixed."""
    if type(key) is int:
        x = (key + 0x9E3779B97F4A7C15) & MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
        return x ^ (x >> 31)
    if isinstance(key, bytes | bytearray | memoryview):
        return zlib.crc32(key)
    if isinstance(key, str):
        return zlib.crc32(key.encode())
    return zlib.crc32(repr(key).encode())


def sampling_rate(slots: float, max_rate: int, min_slots: int) -> int:
    """The largest power of two R <= `max_rate` that leaves a sampled shadow at least `min_slots` slots."""
    if max_rate < 1 or min_slots < 1:
        raise ValueError(f"max_rate={max_rate!r} and min_slots={min_slots!r} must be at least 1")
    rate = 1
    while rate * 2 <= max_rate and slots / (rate * 2) >= min_slots:
        rate *= 2
    return rate


def is_sampled(key: Hashable, rate: int) -> bool:
    """Whether `key` falls in the sampled 1/`rate` of the key space (`rate` a power of two)."""
    return rate == 1 or stable_key_hash(key) & (rate - 1) == 0
