"""Kernel plumbing on CPU: PagedKV validation, the backend registry, launch plans, BlockTransfer."""

from __future__ import annotations

import importlib.util
import itertools
from dataclasses import replace

import pytest
import torch

from ultra_adaptive_kv_cache_engine.kernels import (
    BACKENDS,
    BlockTransfer,
    DecodeShape,
    KernelBackend,
    PagedKV,
    get_backend,
    plan_decode,
    plan_prefill,
    register_backend,
    select_backend,
    triton_available,
)
from ultra_adaptive_kv_cache_engine.kernels.launch_plan import (
    MAX_SPLITS,
    choose_num_splits,
    next_power_of_two,
)


def _pool(blocks: int = 5, layers: int = 2, bs: int = 4, heads: int = 2, dim: int = 8) -> torch.Tensor:
    return torch.randn((blocks, layers, 2, bs, heads, dim), generator=torch.Generator().manual_seed(0))


def test_paged_kv_views_one_layer_of_the_pool():
    pool = _pool()
    kv = PagedKV.from_pool(pool, 1, torch.zeros((3, 2), dtype=torch.int32), torch.ones(3, dtype=torch.int32))
    assert kv.key_cache.data_ptr() == pool[:, 1, 0].data_ptr() and kv.value_cache.shape == (5, 4, 2, 8)
    assert (kv.batch_size, kv.num_blocks, kv.block_size, kv.num_kv_heads, kv.head_dim) == (3, 5, 4, 2, 8)
    assert kv.max_len_bound == 8  # 2 columns x 4 tokens
    assert PagedKV.from_pool(pool, 0, kv.block_tables, kv.seq_lens, max_seq_len=5).max_len_bound == 5


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"block_tables": torch.zeros((3, 2))}, "block_tables has dtype torch.float32"),
        ({"seq_lens": torch.ones(2, dtype=torch.int32)}, "seq_lens has 2 entries but block_tables has 3 rows"),
        ({"block_tables": torch.zeros(3, dtype=torch.int32)}, "block_tables must have 2 dimensions"),
        ({"value_cache": torch.zeros((5, 4, 2, 7))}, "value_cache has shape"),
        ({"value_cache": torch.zeros((5, 4, 2, 8), dtype=torch.float16)}, "value_cache has dtype"),
        ({"key_cache": [1.0]}, "key_cache must be a torch.Tensor"),
        ({"max_seq_len": 9}, "max_seq_len=9 must be an int in \\[0, 8\\]"),
        ({"key_cache": torch.zeros((5, 4, 8, 2)).transpose(2, 3)}, "key_cache must have a contiguous last"),
    ],
)
def test_paged_kv_rejects_bad_metadata(change: dict, match: str):
    fields = {
        "key_cache": torch.zeros((5, 4, 2, 8)), "value_cache": torch.zeros((5, 4, 2, 8)),
        "block_tables": torch.zeros((3, 2), dtype=torch.int32), "seq_lens": torch.ones(3, dtype=torch.int32),
    }
    with pytest.raises((ValueError, TypeError), match=match):
        PagedKV(**{**fields, **change})


def test_from_pool_rejects_bad_layer_and_shape():
    tables, lens = torch.zeros((1, 1), dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="layer=2 must be an int in \\[0, 2\\)"):
        PagedKV.from_pool(_pool(), 2, tables, lens)
    with pytest.raises(ValueError, match="expected dimension 2 to be 2"):
        PagedKV.from_pool(torch.zeros((5, 2, 3, 4, 2, 8)), 0, tables, lens)


def test_registry_picks_reference_on_cpu_and_names_valid_backends():
    assert set(BACKENDS) >= {"reference", "triton"}
    backend = select_backend("cpu")
    assert isinstance(backend, KernelBackend) and backend.name == "reference"
    with pytest.raises(ValueError, match="unknown kernel backend 'cutlass'; expected one of: reference, triton"):
        get_backend("cutlass")
    assert triton_available() == (importlib.util.find_spec("triton") is not None)


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="triton is installed here")
def test_triton_backend_without_triton_says_what_is_missing():
    with pytest.raises(RuntimeError, match="needs the triton package"):
        get_backend("triton")


def test_register_backend_adds_a_name_and_rejects_junk():
    reference = get_backend("reference")
    register_backend("Mine", lambda: reference)
    try:
        assert get_backend("mine") is reference
    finally:
        del BACKENDS["mine"]
    with pytest.raises(ValueError, match="must be callable"):
        register_backend("x", 3)  # type: ignore[arg-type]


def test_decode_plan_fills_the_gpu_for_small_batches_and_not_for_large():
    one = plan_decode(DecodeShape(1, 8, 4, 128, 32768), num_sms=132)  # 8 programs: split up to MAX_SPLITS
    assert (one.num_splits, one.partition_size, one.block_m, one.block_n, one.block_d) == (128, 256, 16, 64, 128)
    assert one.num_stages == 2
    mid = plan_decode(DecodeShape(16, 8, 4, 128, 32768), num_sms=132)  # 128 programs x 16 = 2048 ~ 4 waves of 528
    assert (mid.num_splits, mid.partition_size, mid.block_n, mid.num_stages) == (16, 2048, 64, 2)
    big = plan_decode(DecodeShape(64, 8, 4, 128, 8192), num_sms=132)  # 512 programs already fill a wave
    assert (big.num_splits, big.partition_size, big.block_n, big.num_stages) == (1, 8192, 128, 3)  # long: 128 keys
    short = plan_decode(DecodeShape(1, 8, 4, 128, 100), num_sms=132)  # 2 tiles: too short to split
    assert (short.num_splits, short.partition_size) == (1, 128)
    forced = plan_decode(DecodeShape(2, 2, 2, 40, 100), num_sms=132, num_splits=3, block_n=16)
    assert (forced.num_splits, forced.partition_size, forced.block_d) == (3, 48, 64)
    assert plan_decode(DecodeShape(1, 8, 4, 128, 100, itemsize=4), num_sms=132).block_n == 32
    wide = plan_decode(DecodeShape(64, 8, 4, 128, 8192, itemsize=4), num_sms=132)  # float32: never 128 keys
    assert (wide.block_n, wide.num_stages) == (32, 2)
    pinned = plan_decode(DecodeShape(64, 8, 4, 128, 8192), num_sms=132, block_n=64)  # an override is kept
    assert (pinned.block_n, pinned.partition_size, pinned.num_stages) == (64, 8192, 2)


def test_small_blocks_take_128_key_tiles_from_shorter_partitions():
    shape = DecodeShape(16, 8, 4, 128, 32768)  # 16 splits of 2048 keys
    unknown, large = plan_decode(shape, num_sms=132), plan_decode(replace(shape, block_size=64), num_sms=132)
    small = plan_decode(replace(shape, block_size=16), num_sms=132)
    assert (unknown.num_splits, unknown.block_n, unknown.num_stages) == (16, 64, 2)
    assert large == unknown
    assert (small.num_splits, small.partition_size, small.block_n, small.num_stages) == (16, 2048, 128, 3)
    short = plan_decode(DecodeShape(64, 8, 4, 128, 1024, block_size=16), num_sms=132)  # 1k keys: still 64
    assert (short.num_splits, short.block_n, short.num_stages) == (1, 64, 2)
    f32 = plan_decode(DecodeShape(16, 8, 4, 128, 32768, itemsize=4, block_size=16), num_sms=132)
    assert f32.block_n == 32  # float32 never takes 128-key tiles
    assert plan_decode(replace(shape, block_size=16), num_sms=132, block_n=64).block_n == 64  # override kept
    assert small.heads_first and unknown.heads_first


def test_decode_shape_of_a_paged_kv_names_its_block_size():
    pool = _pool(blocks=6, bs=4)
    tables = torch.zeros((3, 5), dtype=torch.int32)
    kv = PagedKV.from_pool(pool, 1, tables, torch.zeros(3, dtype=torch.int32), max_seq_len=17)
    query = torch.zeros((3, 6, 8), dtype=torch.bfloat16)
    assert kv.decode_shape(query) == DecodeShape(3, 2, 3, 8, 17, itemsize=2, block_size=4)
    assert PagedKV.from_pool(pool, 0, tables, torch.zeros(3, dtype=torch.int32)).decode_shape(query).max_len_bound == 20


def test_split_choice_aims_at_several_waves_with_a_good_last_wave():
    assert choose_num_splits(base=100, slots=400, max_splits=64) == 16  # exactly four full waves
    assert choose_num_splits(base=100, slots=400, max_splits=64, target=400) == 4  # one wave asked
    assert choose_num_splits(base=100, slots=400, max_splits=2) == 2  # clamped by the tiles
    assert choose_num_splits(base=350, slots=400, max_splits=64) == 1  # already 87% full
    assert choose_num_splits(base=30, slots=100, max_splits=64, target=100) == 3  # 0.9 of a wave beats 1.2 waves
    assert choose_num_splits(base=128, slots=528, max_splits=128, target=2112) == 16  # 17 would waste 0.18 wave


@pytest.mark.parametrize(
    ("batch", "group", "dim", "bound"),
    list(itertools.product([1, 3, 64], [1, 4, 7, 32], [17, 64, 128, 256], [0, 1, 63, 1000, 32768])),
)
def test_decode_plan_invariants(batch: int, group: int, dim: int, bound: int):
    plan = plan_decode(DecodeShape(batch, 8, group, dim, bound), num_sms=132)
    for size in (plan.block_m, plan.block_n, plan.block_d):
        assert size >= 16 and next_power_of_two(size) == size
    assert plan.block_m >= group and plan.block_d >= dim
    assert plan.partition_size % plan.block_n == 0 and 1 <= plan.num_splits <= MAX_SPLITS
    if bound:
        assert (plan.num_splits - 1) * plan.partition_size < bound <= plan.num_splits * plan.partition_size


def test_plans_reject_bad_shapes():
    with pytest.raises(ValueError, match="batch=0 must be a positive int"):
        plan_decode(DecodeShape(0, 8, 4, 128, 10), num_sms=132)
    with pytest.raises(ValueError, match="block_size=0 must be a positive int"):
        plan_decode(DecodeShape(1, 8, 4, 128, 10, block_size=0), num_sms=132)
    with pytest.raises(ValueError, match="block_n=48 must be a power of two"):
        plan_decode(DecodeShape(1, 8, 4, 128, 10), num_sms=132, block_n=48)
    with pytest.raises(ValueError, match="group=0"):
        plan_prefill(0, 128, 10)


def test_prefill_plan_rows_cover_whole_groups():
    plan = plan_prefill(group=3, head_dim=40, max_query_len=100)
    assert (plan.block_m, plan.block_q, plan.block_n, plan.block_d, plan.num_q_tiles) == (64, 21, 64, 64, 5)
    assert plan_prefill(group=128, head_dim=128, max_query_len=2).block_m == 128
    wide = plan_prefill(group=4, head_dim=128, max_query_len=100, itemsize=4)  # float32: smaller tiles
    assert (wide.block_m, wide.block_q, wide.block_n, wide.num_q_tiles) == (32, 8, 32, 13)


def test_block_transfer_round_trip_on_cpu_is_exact():
    pool = _pool(blocks=7)
    transfer = BlockTransfer(pool, max_blocks=2)
    host = transfer.to_host([6, 1, 3])
    assert torch.equal(host, pool[[6, 1, 3]]) and not host.is_pinned()
    fresh = torch.randn_like(host)
    expected = pool.clone()
    expected[[0, 2, 5]] = fresh
    transfer.from_host(fresh, torch.tensor([0, 2, 5]))
    assert torch.equal(pool, expected)


def test_host_blocks_of_raw_bytes_land_in_their_pool_blocks():
    pool = _pool(blocks=6)
    transfer = BlockTransfer(pool, max_blocks=1)
    fresh = torch.randn((2, *pool.shape[1:]), generator=torch.Generator().manual_seed(1))
    raw = [fresh[0].reshape(-1).view(torch.uint8).clone(), fresh[1].clone()]  # raw bytes or the block itself
    expected = pool.clone()
    expected[[4, 1]] = fresh
    transfer.from_host_blocks(raw, [4, 1])
    assert torch.equal(pool, expected)
    with pytest.raises(ValueError, match="2 host blocks for 1 block ids"):
        transfer.from_host_blocks(raw, [0])
    with pytest.raises(ValueError, match=r"block ids \[6\] are out of range"):
        transfer.from_host_blocks(raw, [0, 6])
    with pytest.raises(ValueError, match=r"blocks\[1\] holds 4 bytes; a block is 1024"):
        transfer.from_host_blocks([raw[0], torch.zeros(1)], [0, 2])
    assert torch.equal(pool, expected)  # nothing written by a rejected call


def test_block_transfer_rejects_bad_arguments():
    pool = _pool()
    with pytest.raises(ValueError, match="max_blocks=0"):
        BlockTransfer(pool, max_blocks=0)
    transfer = BlockTransfer(pool, max_blocks=4)
    with pytest.raises(ValueError, match="expected torch.float32 \\(2, 2, 2, 4, 2, 8\\)"):
        transfer.to_host([0, 1], out=torch.empty((3, 2, 2, 4, 2, 8)))
    with pytest.raises(ValueError, match="block_ids must be a 1-D int32/int64 tensor"):
        transfer.from_host(torch.empty((1, 2, 2, 4, 2, 8)), torch.tensor([[0]]))
