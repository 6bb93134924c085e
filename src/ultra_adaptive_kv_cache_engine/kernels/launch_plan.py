"""Launch shapes of the Triton attention kernels, chosen from the problem shape (pure functions, torch-free).

Decode uses a split-K (flash-decoding) design: each program owns one (sequence, KV head, context partition),
attends all query heads of that KV head's GQA group at once (so every KV byte is read once), and writes an
unnormalised partial result with its log-sum-exp; a second small kernel merges the partitions. The number of
partitions is chosen so that batch * kv_heads * splits covers the GPU several times over (batch 1 with a long
context still fills every SM) while each partition keeps at least `MIN_TILES_PER_SPLIT` key tiles.

The partition size is derived from a host-side bound on the longest sequence (block table width times block
size, or a tighter `max_seq_len` hint), so planning never reads device memory; partitions past a sequence's
end do no work.

Invariants: block_m, block_n and block_d are powers of two >= 16 (tl.dot's minimum); block_m >= group;
block_d >= head_dim; partition_size is a positive multiple of block_n; num_splits * partition_size >=
max_len_bound and (num_splits - 1) * partition_size < max_len_bound when max_len_bound > 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Programs per SM that the split heuristic aims for (several resident CTAs hide HBM latency).
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


def plan_decode(
    shape: DecodeShape, num_sms: int, num_splits: int | None = None, block_n: int | None = None
) -> DecodeLaunch:
    """The decode launch for `shape`; `num_splits` (clamped to the key tiles) and `block_n` (a power of two
    >= 16) override the heuristics, for tuning and tests."""
    batch, num_kv_heads, group, head_dim = shape.batch, shape.num_kv_heads, shape.group, shape.head_dim
    _require_positive(batch=batch, num_kv_heads=num_kv_heads, group=group, head_dim=head_dim, num_sms=num_sms)
    max_len_bound = shape.max_len_bound
    if num_splits is not None:
        _require_positive(num_splits=num_splits)
    if block_n is not None and (not isinstance(block_n, int) or block_n < 16 or next_power_of_two(block_n) != block_n):
        raise ValueError(f"block_n={block_n!r} must be a power of two >= 16")
    block_d = max(16, next_power_of_two(head_dim))
    block_m = max(16, next_power_of_two(group))
    if block_n is None:
        block_n = 64 if block_d <= 128 else 32
    tiles = max(1, _cdiv(max_len_bound, block_n))
    if num_splits is None:
        wanted = _cdiv(PROGRAMS_PER_SM * num_sms, batch * num_kv_heads)
        num_splits = min(wanted, MAX_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))
    tiles_per_split = _cdiv(tiles, min(num_splits, tiles))
    partition = tiles_per_split * block_n
    splits = _cdiv(tiles, tiles_per_split)
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    return DecodeLaunch(block_m, block_n, block_d, splits, partition, num_warps, num_stages=3)


def plan_prefill(group: int, head_dim: int, max_query_len: int) -> PrefillLaunch:
    """The prefill launch: 64-row query tiles (block_q tokens x group heads) over 64-key tiles."""
    _require_positive(group=group, head_dim=head_dim)
    block_d = max(16, next_power_of_two(head_dim))
    block_m = max(64, next_power_of_two(group))
    block_q = block_m // group
    block_n = 64 if block_d <= 128 else 32
    tiles = max(0, _cdiv(max_query_len, block_q))
    return PrefillLaunch(block_m, block_q, block_n, block_d, tiles, num_warps=4, num_stages=2)
