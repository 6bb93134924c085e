"""The plain-PyTorch kernels against the float64 oracle (CPU): attention within tolerance, block moves exact."""

from __future__ import annotations

import pytest
import torch
from test_kernels_oracle import LAYER, World, assert_close_rel, build, oracle, tolerance

from ultra_adaptive_kv_cache_engine.kernels import (
    PagedKV,
    reference_decode_attention,
    reference_gather_blocks,
    reference_prefill_attention,
    reference_scatter_blocks,
    reference_write_kv,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DECODE_WORLDS = [
    World(seq_lens=(1, 16, 37), q_lens=(1, 1, 1)),  # one token, exactly one block, ragged
    World(seq_lens=(300, 5), q_lens=(1, 1), q_heads=8, kv_heads=2, head_dim=40, block_size=128),
    World(seq_lens=(33, 64, 2), q_lens=(1, 1, 1), q_heads=3, kv_heads=3, head_dim=17, block_size=5),  # MHA, odd
    World(seq_lens=(250,), q_lens=(1,), q_heads=32, kv_heads=8, head_dim=128, block_size=16),  # Llama-3 heads
]
PREFILL_WORLDS = [
    World(seq_lens=(20, 37, 5), q_lens=(20, 7, 1)),  # no prefix, prefix + new, decode-like
    World(seq_lens=(70, 9, 40), q_lens=(3, 0, 40), q_heads=6, kv_heads=2, head_dim=40, block_size=16),  # empty span
    World(seq_lens=(130,), q_lens=(65,), q_heads=4, kv_heads=1, head_dim=17, block_size=7),  # MQA, odd sizes
]


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", DECODE_WORLDS, ids=str)
def test_decode_matches_oracle(world: World, dtype: torch.dtype):
    batch = build(World(**{**world.__dict__, "dtype": dtype}), seed=11)
    out = _nan_like(batch.query)
    returned = reference_decode_attention(batch.query, batch.kv(), out=out)
    assert returned is out and out.dtype == dtype
    assert_close_rel(out, oracle(batch), tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("world", PREFILL_WORLDS, ids=str)
def test_prefill_matches_oracle(world: World, dtype: torch.dtype):
    batch = build(World(**{**world.__dict__, "dtype": dtype}), seed=12)
    out = _nan_like(batch.query)
    reference_prefill_attention(batch.query, batch.query_start_loc, batch.kv(), out=out)
    assert_close_rel(out, oracle(batch), tolerance(dtype))


def test_decode_honours_scale_and_returns_new_tensor():
    batch = build(World(seq_lens=(9, 30), q_lens=(1, 1)), seed=13)
    result = reference_decode_attention(batch.query, batch.kv(), scale=0.37)
    assert_close_rel(result, oracle(batch, scale=0.37), 1e-6)


def test_float64_reference_agrees_with_oracle_to_rounding():
    batch = build(World(seq_lens=(45, 3), q_lens=(4, 3), dtype=torch.float64), seed=14)
    result = reference_prefill_attention(batch.query, batch.query_start_loc, batch.kv())
    assert result.dtype == torch.float64
    assert_close_rel(result, oracle(batch), 1e-12)


def test_decode_equals_prefill_of_one_token():
    batch = build(World(seq_lens=(40, 3, 17), q_lens=(1, 1, 1)), seed=15)
    decode = reference_decode_attention(batch.query, batch.kv())
    prefill = reference_prefill_attention(batch.query, batch.query_start_loc, batch.kv())
    assert_close_rel(decode, prefill, 1e-6)


def test_decode_rejects_bad_lengths_and_block_ids():
    batch = build(World(seq_lens=(9, 30), q_lens=(1, 1)), seed=16)
    with pytest.raises(ValueError, match=r"seq_lens\[0\]=0"):
        reference_decode_attention(batch.query, PagedKV.from_pool(batch.pool, LAYER, batch.block_tables,
                                                                  torch.tensor([0, 30], dtype=torch.int32)))
    with pytest.raises(ValueError, match=r"seq_lens\[1\]=49"):  # 3 columns x 16 = 48 slots
        reference_decode_attention(batch.query, PagedKV.from_pool(batch.pool, LAYER, batch.block_tables,
                                                                  torch.tensor([9, 49], dtype=torch.int32)))
    tables = batch.block_tables.clone()
    tables[1, 1] = -3
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\]=-3"):
        reference_decode_attention(batch.query, PagedKV.from_pool(batch.pool, LAYER, tables, batch.seq_lens))


def test_prefill_rejects_bad_query_offsets():
    batch = build(World(seq_lens=(9, 30), q_lens=(2, 3)), seed=17)
    kv = batch.kv()
    with pytest.raises(ValueError, match="end at total_q=5"):
        reference_prefill_attention(batch.query, torch.tensor([0, 2, 4], dtype=torch.int32), kv)
    with pytest.raises(ValueError, match="batch \\+ 1 = 3"):
        reference_prefill_attention(batch.query, torch.tensor([0, 5], dtype=torch.int32), kv)
    short = PagedKV.from_pool(batch.pool, LAYER, batch.block_tables, torch.tensor([1, 30], dtype=torch.int32))
    with pytest.raises(ValueError, match="sequence 0 has 2 new tokens"):
        reference_prefill_attention(batch.query, batch.query_start_loc, short)


def test_attention_rejects_mismatched_query():
    batch = build(World(seq_lens=(9,), q_lens=(1,)), seed=18)
    kv = batch.kv()
    with pytest.raises(ValueError, match="head_dim 23"):
        reference_decode_attention(batch.query[..., :23], kv)
    with pytest.raises(ValueError, match="multiple of num_kv_heads=2"):
        reference_decode_attention(batch.query[:, :3], kv)
    with pytest.raises(ValueError, match="dtype torch.float16"):
        reference_decode_attention(batch.query.half(), kv)
    with pytest.raises(ValueError, match="scale=-1"):
        reference_decode_attention(batch.query, kv, scale=-1)
    with pytest.raises(ValueError, match="out has shape"):
        reference_decode_attention(batch.query, kv, out=torch.empty(2, 4, 24))


def _write_world(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    pool = torch.randn((6, 2, 2, 5, 3, 7), generator=gen).to(dtype)
    slots = torch.tensor([29, 0, 7, 13, 4], dtype=torch.int64)
    key = torch.randn((5, 3, 7), generator=gen).to(dtype)
    value = torch.randn((5, 3, 7), generator=gen).to(dtype)
    return pool, slots, key, value


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_puts_each_token_in_its_slot_and_nothing_else(dtype: torch.dtype):
    pool, slots, key, value = _write_world(dtype)
    expected = pool.clone()
    for i, slot in enumerate(slots.tolist()):
        expected[slot // 5, 1, 0, slot % 5] = key[i]
        expected[slot // 5, 1, 1, slot % 5] = value[i]
    reference_write_kv(key, value, pool[:, 1, 0], pool[:, 1, 1], slots.int())
    assert torch.equal(pool, expected)


def test_write_kv_rejects_bad_slots_and_leaves_the_cache_intact():
    pool, slots, key, value = _write_world(torch.float32)
    before = pool.clone()
    for bad, match in (([29, 0, 7, 13, 30], "slot_mapping\\[4\\]=30"), ([-1, 0, 7, 13, 4], "slot_mapping\\[0\\]=-1"),
                       ([1, 0, 7, 13, 1], "twice")):
        with pytest.raises(ValueError, match=match):
            reference_write_kv(key, value, pool[:, 1, 0], pool[:, 1, 1], torch.tensor(bad))
    with pytest.raises(ValueError, match="key has shape"):
        reference_write_kv(key[:4], value, pool[:, 1, 0], pool[:, 1, 1], slots)
    with pytest.raises(ValueError, match="slot_mapping has dtype torch.float32"):
        reference_write_kv(key, value, pool[:, 1, 0], pool[:, 1, 1], slots.float())
    assert torch.equal(pool, before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_then_scatter_moves_exact_blocks(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(22)
    pool = torch.randn((9, 2, 2, 3, 2, 5), generator=gen).to(dtype)
    ids = torch.tensor([7, 0, 4, 4], dtype=torch.int32)  # gather may repeat an id
    out = torch.full((4, 2, 2, 3, 2, 5), float("nan"), dtype=dtype)
    assert reference_gather_blocks(pool, ids, out) is out
    assert torch.equal(out, torch.stack([pool[7], pool[0], pool[4], pool[4]]))
    staging = torch.randn((3, 2, 2, 3, 2, 5), generator=gen).to(dtype)
    expected = pool.clone()
    expected[[8, 1, 3]] = staging
    reference_scatter_blocks(staging, pool, torch.tensor([8, 1, 3]))
    assert torch.equal(pool, expected)


def test_block_moves_reject_bad_ids_and_staging():
    pool = torch.randn((4, 2, 3))
    before = pool.clone()
    with pytest.raises(ValueError, match="block_ids\\[1\\]=4"):
        reference_gather_blocks(pool, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="twice"):
        reference_scatter_blocks(torch.zeros(2, 2, 3), pool, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="staging has shape"):
        reference_scatter_blocks(torch.zeros(2, 3, 3), pool, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contiguous"):
        reference_gather_blocks(pool.transpose(1, 2), torch.tensor([0]))
    assert torch.equal(pool, before)
