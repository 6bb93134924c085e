"""The fp8 kernel's launch plan (`plan_token_decode`): one pipeline stage, plan_decode's tiles, and two
partitions at least from `TOKEN_DECODE_SPLIT_KEYS` keys."""

from __future__ import annotations

from ultra_adaptive_kv_cache_engine.kernels.launch_plan import (
    TOKEN_DECODE_SPLIT_KEYS,
    DecodeShape,
    plan_decode,
    plan_token_decode,
)


def test_a_long_batch_is_split_in_two_with_one_stage():
    shape = DecodeShape(64, 8, 4, 128, 8192, itemsize=2, block_size=16)
    plan, base = plan_token_decode(shape, 132), plan_decode(shape, 132)
    assert (base.num_splits, base.num_stages) == (1, 3)
    assert (plan.block_n, plan.num_splits, plan.partition_size, plan.num_stages) == (128, 2, 4096, 1)
    assert plan.max_registers is None


def test_short_sequences_keep_the_plan_s_partitions():
    shape = DecodeShape(64, 8, 4, 128, TOKEN_DECODE_SPLIT_KEYS - 16, itemsize=2, block_size=16)
    plan, base = plan_token_decode(shape, 132), plan_decode(shape, 132)
    assert (plan.num_splits, plan.partition_size, plan.block_n) == (base.num_splits, base.partition_size, base.block_n)
    assert plan.num_stages == 1


def test_a_small_batch_keeps_its_own_larger_split():
    shape = DecodeShape(2, 8, 4, 128, 32768, itemsize=2, block_size=16)
    plan = plan_token_decode(shape, 132)
    assert plan.num_splits == plan_decode(shape, 132).num_splits > 2 and plan.num_stages == 1
