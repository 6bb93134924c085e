"""Launch shapes of the Triton attention kernels, chosen from the problem shape (pure functions, torch-free).

Decode uses a split-K (flash-decoding) design: each program owns one (sequence, KV head, context partition),
attends all query heads of that KV head's GQA group at once (so every KV byte is read once), and writes its
normalised partial result with its log-sum-exp; a second small kernel merges the partitions.

Split count (as FlashAttention-2's heuristic, counting resident programs rather than SMs): with
``slots = num_sms * PROGRAMS_PER_SM`` programs resident at once and ``base = batch * kv_heads``, a batch that
already fills most slots (base >= 0.8 * slots) is not split; otherwise the smallest split count whose wave
efficiency (waves / ceil(waves), waves = base * splits / slots) is within 85% of the best is taken, never
more than leaves each partition `MIN_TILES_PER_SPLIT` key tiles, nor `MAX_SPLITS`. So batch 1 with a long
context fills every SM, and batch 64 reads each sequence in one pass.

The partition size is derived from a host-side bound on the longest sequence (block table width times block
size, or a tighter `max_seq_len` hint), so planning never reads device memory; partitions past a sequence's
end do no work. Tiles are smaller for 4-byte elements (IEEE float32 dot products need more registers).

Invariants: block_m, block_n and block_d are powers of two >= 16 (tl.dot's minimum); block_m >= group;
block_d >= head_dim; partition_size is a positive multiple of block_n; num_splits * partition_size >=
max_len_bound and (num_splits - 1) * partition_size < max_len_bound when max_len_bound > 0.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

#: Decode programs resident per SM assumed by the split heuristic (about 5 fit at 96 registers, 39 KB smem).
PROGRAMS_PER_SM = 4
#: A partition covers at least this many key tiles, so the merge stays cheap next to the partition's reads.
MIN_TILES_PER_SPLIT = 4
#: Upper bound on the number of partitions of one sequence.
MAX_SPLITS = 128
#: SM count assumed when the device does not say (an H100/H200 has 132).
DEFAULT_NUM_SMS = 132


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _require_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")


@dataclass(frozen=True)
class DecodeShape:
    """What the decode planner needs to know of a batch: sizes only, all host-side ints."""

    batch: int
    num_kv_heads: int
    group: int  # query heads per KV head
    head_dim: int
    max_len_bound: int  # an upper bound on every sequence length
    itemsize: int = 2  # bytes per KV element


@dataclass(frozen=True)
class DecodeLaunch:
    """Tile sizes, partitioning and warp counts of one decode launch."""

    block_m: int  # query rows per program: the GQA group, padded
    block_n: int  # keys per loop iteration
    block_d: int  # head_dim, padded
    num_splits: int  # context partitions per (sequence, KV head)
    partition_size: int  # keys per partition, a multiple of block_n
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class PrefillLaunch:
    """Tile sizes and warp counts of one prefill launch."""

    block_m: int  # rows per program: block_q tokens x group heads, padded to a power of two
    block_q: int  # new tokens per program
    block_n: int
    block_d: int
    num_q_tiles: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=1024)
def choose_num_splits(base: int, slots: int, max_splits: int) -> int:
    """The split count of the module docstring's heuristic, for `base` programs per split and `slots`."""
    if max_splits <= 1 or base >= 0.8 * slots:
        return 1
    efficiency = {}
    for splits in range(1, max_splits + 1):
        waves = base * splits / slots
        efficiency[splits] = waves / _cdiv(base * splits, slots)
    best = max(efficiency.values())
    return min(s for s, e in efficiency.items() if e >= 0.85 * best)


@functools.lru_cache(maxsize=1024)  # the decode hot path plans the same shapes over and over
def plan_decode(
    shape: DecodeShape, num_sms: int, num_splits: int | None = None, block_n: int | None = None
) -> DecodeLaunch:
    """The decode launch for `shape`; `num_splits` (clamped to the key tiles) and `block_n` (a power of two
    >= 16) override the heuristics, for tuning and tests."""
    batch, kv_heads, group, head_dim = shape.batch, shape.num_kv_heads, shape.group, shape.head_dim
    _require_positive(batch=batch, num_kv_heads=kv_heads, group=group, head_dim=head_dim, num_sms=num_sms)
    if num_splits is not None:
        _require_positive(num_splits=num_splits)
    if block_n is not None and (not isinstance(block_n, int) or block_n < 16 or next_power_of_two(block_n) != block_n):
        raise ValueError(f"block_n={block_n!r} must be a power of two >= 16")
    block_d = max(16, next_power_of_two(head_dim))
    block_m = max(16, next_power_of_two(group))
    if block_n is None:
        block_n = 64 if block_d <= 128 and shape.itemsize <= 2 else 32
    tiles = max(1, _cdiv(shape.max_len_bound, block_n))
    if num_splits is None:
        max_splits = min(MAX_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))
        num_splits = choose_num_splits(batch * kv_heads, num_sms * PROGRAMS_PER_SM, max_splits)
    tiles_per_split = _cdiv(tiles, min(num_splits, tiles))
    splits = _cdiv(tiles, tiles_per_split)
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    return DecodeLaunch(block_m, block_n, block_d, splits, tiles_per_split * block_n, num_warps, num_stages=3)


@functools.lru_cache(maxsize=1024)
def plan_prefill(group: int, head_dim: int, max_query_len: int, itemsize: int = 2) -> PrefillLaunch:
    """The prefill launch: query tiles of block_q tokens x group heads over key tiles (64 x 64 rows for
    2-byte elements and head_dim <= 128; 32 x 32 for float32, whose IEEE dot products need more registers)."""
    _require_positive(group=group, head_dim=head_dim, itemsize=itemsize)
    block_d = max(16, next_power_of_two(head_dim))
    small = itemsize > 2 or block_d > 128
    block_m = max(32 if itemsize > 2 else 64, next_power_of_two(group))
    block_n = 32 if small else 64
    block_q = block_m // group
    tiles = max(0, _cdiv(max_query_len, block_q))
    return PrefillLaunch(block_m, block_q, block_n, block_d, tiles, num_warps=4, num_stages=2)
