"""Spatial sampling of keys (SHARDS): a stable hash picks the same 1/R of the key space in every process.

Why: a shadow cache only has to rank policies, and a shadow fed the keys of a fixed 1/R of the key space,
at 1/R of the capacity, hits in about the same proportion as a full one (Waldspurger et al., FAST'15), at
1/R of the cost. The hash must be deterministic across processes and machines (never Python's `hash()`,
which is salted per process): ints (trace block ids) go through Fibonacci hashing, bytes (block
digests) and str through CRC-32 of their bytes, anything else through CRC-32 of its repr; a key is sampled
when its hash falls below 2^64 / R.
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / the golden ratio: Fibonacci hashing spreads consecutive ints evenly


def stable_key_hash(key: Hashable) -> int:
    """A hash of `key` in [0, 2^64), equal in every process; its high bits are well spread.

    ints: Fibonacci hashing (key * GOLDEN mod 2^64: consecutive ids land evenly); bytes and str: CRC-32 of
    their bytes, in the high 32 bits; anything else: CRC-32 of its repr.
    """
    if type(key) is int:
        return (key * GOLDEN) & MASK64
    if isinstance(key, bytes | bytearray | memoryview):
        return zlib.crc32(key) << 32
    if isinstance(key, str):
        return zlib.crc32(key.encode()) << 32
    return zlib.crc32(repr(key).encode()) << 32


def sampling_rate(slots: float, max_rate: int, min_slots: int) -> int:
    """The largest power of two R <= `max_rate` that leaves a sampled shadow at least `min_slots` slots."""
    if max_rate < 1 or min_slots < 1:
        raise ValueError(f"max_rate={max_rate!r} and min_slots={min_slots!r} must be at least 1")
    rate = 1
    while rate * 2 <= max_rate and slots / (rate * 2) >= min_slots:
        rate *= 2
    return rate


def sample_limit(rate: int) -> int:
    """Keys whose `stable_key_hash` is below this are the sampled 1/`rate` of the key space."""
    return (1 << 64) // rate


def is_sampled(key: Hashable, rate: int) -> bool:
    """Whether `key` falls in the sampled 1/`rate` of the key space."""
    return rate == 1 or stable_key_hash(key) < sample_limit(rate)
