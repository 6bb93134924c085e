"""Launch shapes of the Triton attention kernels, chosen from the problem shape (pure functions, torch-free).

Decode uses a split-K (flash-decoding) design: each program owns one (sequence, KV head, context partition),
attends all query heads of that KV head's GQA group at once (so every KV byte is read once), and writes its
normalised partial result with its log-sum-exp; a second small kernel merges the partitions.

Split count: with ``slots = num_sms * PROGRAMS_PER_SM`` programs resident at once and ``base = batch *
kv_heads``, a batch that already fills most of one wave (base >= 0.8 * slots) is not split. A smaller grid is
split towards ``num_sms * SPLIT_PROGRAMS_PER_SM`` programs (several waves, so the partition tails and the
merge hide behind other programs), never leaving a partition fewer than `MIN_TILES_PER_SPLIT` key tiles nor
more than `MAX_SPLITS` partitions; among the counts up to that target, the largest whose wave efficiency
(waves / ceil(waves), waves = base * splits / slots) is within 90% of the best is taken.

Key tiles and pipelining: 64 keys per tile with 2 pipeline stages; 128 keys with 3 stages once a program
walks at least `LONG_PARTITION` keys (2-byte elements, head_dim <= 128); 32-key tiles for 4-byte elements
(IEEE float32 dot products need more registers). Small blocks (at most `SMALL_BLOCK` tokens) switch to
128-key tiles from `LONG_PARTITION_SMALL_BLOCKS` keys: a tile then gathers 8 blocks, and in the engine's
block-major pool (all layers of a block together) each block's slab of one layer lies in its own 2 MiB
page, so a tile waits on more address translations and wants more bytes in flight. Measured on an H200
(bf16, 32 query / 8 KV heads, head_dim 128, block size 16, ratios to the best SDPA on contiguous KV; single
launches timed one at a time, so noisy by +-10%): batch 64 x 8k keys, one partition: 128-key tiles with
3 stages 0.987 and 0.92 (two runs), 64-key tiles 0.985 with 2 stages and 0.865 with 3. Batch 16 x 32k keys,
16 splits (2k-key partitions): 64-key tiles 0.952 (3 stages) and 0.80 (2 stages), 128-key tiles 0.886;
8 warps 0.72-0.75 in one run, 0.86-0.92 in the other.

Grid order: the programs of one sequence's KV heads are adjacent in launch order (`DecodeLaunch.heads_first`),
so they run side by side and read the same blocks (each token's keys of all heads are one 2 KiB row) at
about the same time, sharing page translations and DRAM rows; the batch-major order is kept for comparison.

The partition size is derived from a host-side bound on the longest sequence (block table width times block
size, or a tighter `max_seq_len` hint), so planning never reads device memory; partitions past a sequence's
end do no work.

Invariants: block_m, block_n and block_d are powers of two >= 16 (tl.dot's minimum); block_m >= group;
block_d >= head_dim; partition_size is a positive multiple of block_n; num_splits * partition_size >=
max_len_bound and (num_splits - 1) * partition_size < max_len_bound when max_len_bound > 0.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

#: Decode programs resident per SM assumed by the split heuristic (about 5 fit at 96 registers, 39 KB smem).
PROGRAMS_PER_SM = 4
#: Programs per SM that splitting aims the grid at (about four waves of `PROGRAMS_PER_SM`).
SPLIT_PROGRAMS_PER_SM = 16
#: A partition covers at least this many key tiles, so the merge stays cheap next to the partition's reads.
MIN_TILES_PER_SPLIT = 4
#: Keys per program from which 128-key tiles (3 stages) replace 64-key tiles (2 stages).
LONG_PARTITION = 4096
#: Blocks of at most this many tokens are small: see `LONG_PARTITION_SMALL_BLOCKS`.
SMALL_BLOCK = 16
#: Keys per program from which 128-key tiles (3 stages) replace 64-key tiles when blocks are small.
LONG_PARTITION_SMALL_BLOCKS = 2048
#: Upper bound on the number of partitions of one sequence.
MAX_SPLITS = 128
#: SM count assumed when the device does not say (an H100/H200 has 132).
DEFAULT_NUM_SMS = 132
#: Pipeline stages at most for decode over quantized slabs: a third stage only adds shared memory and
#: registers. H200, batch 64 x 8k keys, block size 16, 128-key tiles, one partition: the generic kernel, fp8
#: 0.764 ms with 2 stages vs 0.857 ms with 3, int4 1.068 vs 1.133 (64-key tiles: 0.934 and 1.285; 32-key
#: tiles slower still; 8 warps about 2x slower); the fp8 kernel (`triton_token_decode`) 0.571 ms with 2 stages
#: vs 0.651 with 3 and 2.09 with 4 (bf16 blocks 0.504 ms in the same rounds).
QUANT_MAX_STAGES = 2


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
    block_size: int | None = None  # tokens per KV block; None: not known, planned as for large blocks


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
    heads_first: bool = True  # grid (kv_heads, batch, splits): one sequence's heads launch side by side
    max_registers: int | None = None  # registers per thread at most (None: the compiler's choice)


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


def _wave_efficiency(programs: int, slots: int) -> float:
    waves = programs / slots
    return waves / _cdiv(programs, slots)


@functools.lru_cache(maxsize=1024)
def choose_num_splits(base: int, slots: int, max_splits: int, target: int | None = None) -> int:
    """The split count of the module docstring's heuristic, for `base` programs per split, `slots` resident
    programs (one wave) and a grid of about `target` programs (default: four waves)."""
    if max_splits <= 1 or base >= 0.8 * slots:
        return 1
    target = 4 * slots if target is None else target
    top = max(1, min(max_splits, _cdiv(target, base)))
    efficiency = {s: _wave_efficiency(base * s, slots) for s in range(1, top + 1)}
    best = max(efficiency.values())
    return max(s for s, e in efficiency.items() if e >= 0.9 * best)


@functools.lru_cache(maxsize=1024)  # the decode hot path plans the same shapes over and over
def plan_decode(
    shape: DecodeShape, num_sms: int, num_splits: int | None = None, block_n: int | None = None
) -> DecodeLaunch:
    """The decode launch for `shape`; `num_splits` (clamped to the key tiles) and `block_n` (a power of two
    >= 16) override the heuristics, for tuning and tests. The split count is chosen for 64-key tiles (32 for
    4-byte elements) and kept when long partitions switch to 128-key tiles (unless that leaves fewer tiles)."""
    batch, kv_heads, group, head_dim = shape.batch, shape.num_kv_heads, shape.group, shape.head_dim
    _require_positive(batch=batch, num_kv_heads=kv_heads, group=group, head_dim=head_dim, num_sms=num_sms)
    if num_splits is not None:
        _require_positive(num_splits=num_splits)
    if shape.block_size is not None:
        _require_positive(block_size=shape.block_size)
    if block_n is not None and (not isinstance(block_n, int) or block_n < 16 or next_power_of_two(block_n) != block_n):
        raise ValueError(f"block_n={block_n!r} must be a power of two >= 16")
    block_d = max(16, next_power_of_two(head_dim))
    block_m = max(16, next_power_of_two(group))
    narrow = shape.itemsize <= 2 and block_d <= 128
    tile = block_n if block_n is not None else (64 if narrow else 32)
    tiles = max(1, _cdiv(shape.max_len_bound, tile))
    if num_splits is None:
        max_splits = min(MAX_SPLITS, max(1, tiles // MIN_TILES_PER_SPLIT))
        slots = num_sms * PROGRAMS_PER_SM
        num_splits = choose_num_splits(batch * kv_heads, slots, max_splits, num_sms * SPLIT_PROGRAMS_PER_SM)
    splits = min(num_splits, tiles)
    small_blocks = shape.block_size is not None and shape.block_size <= SMALL_BLOCK
    long_partition = LONG_PARTITION_SMALL_BLOCKS if small_blocks else LONG_PARTITION
    if block_n is None and narrow and _cdiv(tiles, splits) * tile >= long_partition:
        tile, tiles = 128, max(1, _cdiv(shape.max_len_bound, 128))  # long partitions stream 128-key tiles
        splits = min(splits, tiles)
    tiles_per_split = _cdiv(tiles, splits)
    splits = _cdiv(tiles, tiles_per_split)
    num_warps = 4 if block_m * block_d <= 64 * 128 else 8
    num_stages = 3 if tile >= 128 else 2
    return DecodeLaunch(block_m, tile, block_d, splits, tiles_per_split * tile, num_warps, num_stages)


@functools.lru_cache(maxsize=1024)
def plan_quant_decode(
    shape: DecodeShape, num_sms: int, num_splits: int | None = None, block_n: int | None = None
) -> DecodeLaunch:
    """The decode launch over quantized slabs (`PagedKV.quant`): `plan_decode`'s tiles and splits with at most
    `QUANT_MAX_STAGES` pipeline stages."""
    plan = plan_decode(shape, num_sms, num_splits, block_n)
    return dataclasses.replace(plan, num_stages=min(plan.num_stages, QUANT_MAX_STAGES))


#: The fp8 kernel (`triton_token_decode`) streams its codes without a software pipeline: H200, batch 64 x 8k
#: keys, block size 16, 128-key tiles, two calls of the same sweep: 1 stage 0.558 / 0.560 ms, 2 stages 0.615 /
#: 0.617, 3 stages 0.657 (bf16 blocks 0.513 ms in the same runs); a register cap (168 or 128 per thread, for
#: more programs per SM) spills and runs 0.80-0.99 ms; 64- or 256-key tiles and 8 warps are slower too.
TOKEN_DECODE_STAGES = 1
#: Sequences of at least this many keys are split in two partitions at least by the fp8 kernel (same sweep:
#: 1 stage and 2 partitions 0.546 ms, 3 partitions 0.546, 1 partition 0.560).
TOKEN_DECODE_SPLIT_KEYS = 4096


@functools.lru_cache(maxsize=1024)
def plan_token_decode(shape: DecodeShape, num_sms: int) -> DecodeLaunch:
    """The launch of the fp8 kernel: `plan_decode`'s tiles with `TOKEN_DECODE_STAGES` stages, and at least two
    partitions for sequences of `TOKEN_DECODE_SPLIT_KEYS` keys or more."""
    plan = plan_decode(shape, num_sms)
    if plan.num_splits == 1 and shape.max_len_bound >= TOKEN_DECODE_SPLIT_KEYS:
        plan = plan_decode(shape, num_sms, num_splits=2)
    return dataclasses.replace(plan, num_stages=TOKEN_DECODE_STAGES)


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
