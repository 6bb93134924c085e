"""`WorkingKV`: the CPU working slab. Rows, compaction and budget in exact state; the packed forward over it
gives the paged forward's logits and writes the same KV into the pool (tiny random Llama, CPU, float32)."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.working_kv import WorkingChunk, WorkingKV

BS = 4


@pytest.fixture(scope="module")
def model() -> PagedLlama:
    return PagedLlama.from_hf(tiny_model().model)


def _pool(model: PagedLlama, blocks: int = 24) -> torch.Tensor:
    s = model.shape
    return torch.zeros((blocks, s.num_layers, 2, BS, s.num_kv_heads, s.head_dim), dtype=model.dtype)


def _working(model: PagedLlama, budget: int = 1 << 30) -> WorkingKV:
    s = model.shape
    return WorkingKV(s.num_layers, s.num_kv_heads, s.head_dim, model.dtype, model.device, budget)


def _step(model, pool, working, chunks):
    """One packed forward of `chunks` (key, ids, start, table): paged when `working` is None."""
    inputs = PackedInputs.pack([(ids, start, table) for _, ids, start, table in chunks], model.device, BS)
    batch = None if working is None else working.batch(
        pool, [WorkingChunk(key, start, start + len(ids), table) for key, ids, start, table in chunks])
    assert working is None or batch is not None
    return model.forward_packed(pool, inputs, working=batch)


def test_forward_over_the_slab_equals_the_paged_forward_step_by_step(model):
    a, b, c = random_ids(9, seed=1), random_ids(6, seed=2), random_ids(5, seed=3)
    tables = {0: [0, 1, 2, 3, 4], 1: [5, 6, 7, 8], 2: [9, 10, 11, 12]}
    paged_pool, slab_pool, working = _pool(model), _pool(model), _working(model)
    # a's first 8 tokens are a cached prefix: in both pools, computed by the paged forward
    for pool in (paged_pool, slab_pool):
        _step(model, pool, None, [(0, a[:8], 0, tables[0])])
    steps = [
        [(0, a[8:], 8, tables[0]), (1, b, 0, tables[1])],  # a's row is filled from the pool, b is prefilled
        [(0, [7], 9, tables[0]), (1, [8], 6, tables[1]), (2, c[:3], 0, tables[2])],  # decodes and a chunk
        [(0, [9], 10, tables[0]), (1, [10], 7, tables[1]), (2, c[3:], 3, tables[2])],
        [(2, [11], 5, tables[2]), (1, [12], 8, tables[1])],  # after a closed (dropped: c moves into row 0)
    ]
    for i, chunks in enumerate(steps):
        if i == 3:
            working.drop(0)
            assert (working.row_of(2), working.row_of(1), working.row_of(0)) == (0, 1, None)
        expected = _step(model, paged_pool, None, chunks)
        got = _step(model, slab_pool, working, chunks)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(slab_pool, paged_pool, rtol=0, atol=1e-6)
    assert len(working) == 2 and working._valid == {1: 9, 2: 6}


def test_rows_are_dense_and_the_slab_stays_until_released(model):
    pool, working = _pool(model), _working(model)
    batch = working.batch(pool, [WorkingChunk(k, 0, 3, [k]) for k in (7, 8, 9)])
    assert batch is not None and [working.row_of(k) for k in (7, 8, 9)] == [0, 1, 2]
    assert working.slab is not None and tuple(working.slab.shape[:1]) + tuple(working.slab.shape[4:5]) == (4, 64)
    working.drop(7)
    assert [working.row_of(k) for k in (7, 8, 9)] == [None, 1, 0]
    working.drop(7)  # nothing held: nothing happens
    working.drop(9)
    working.drop(8)
    assert len(working) == 0 and working.slab is not None and working.bytes_held == 4 * 64 * 2 * model.shape.num_layers \
        * model.shape.num_kv_heads * model.shape.head_dim * 4
    assert working.batch(pool, [WorkingChunk(5, 0, 2, [5])]) is not None and working.row_of(5) == 0
    working.release()
    assert len(working) == 0 and working.slab is None and working.bytes_held == 0 and working.row_of(5) is None


def test_a_batch_past_the_budget_is_refused_and_changes_nothing(model):
    s = model.shape
    position_bytes = s.num_layers * 2 * s.num_kv_heads * s.head_dim * 4
    pool, working = _pool(model), _working(model, budget=4 * 64 * position_bytes)  # 4 rows of 64 positions
    assert working.batch(pool, [WorkingChunk(1, 0, 64, list(range(16)))]) is not None
    assert working.batch(pool, [WorkingChunk(1, 64, 65, list(range(17)))]) is None  # capacity 128: too big
    assert working.batch(pool, [WorkingChunk(k, 0, 1, [k]) for k in (2, 3, 4, 5)]) is None  # 5 rows
    assert len(working) == 1 and working.bytes_held == 4 * 64 * position_bytes


def test_bad_tables_raise_before_anything_changes(model):
    pool, working = _pool(model, blocks=8), _working(model)
    with pytest.raises(ValueError, match="block id 8 of sequence 1 is not a block of the pool"):
        working.batch(pool, [WorkingChunk(1, 0, 5, [0, 8])])
    with pytest.raises(ValueError, match="sequence 2 writes a pool slot that another sequence"):
        working.batch(pool, [WorkingChunk(1, 0, 2, [3]), WorkingChunk(2, 1, 2, [3])])
    with pytest.raises(ValueError, match=r"sequence 1: positions 0..8 with a 2-block table"):
        working.batch(pool, [WorkingChunk(1, 0, 9, [0, 1])])
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        _working(model, budget=-1)
    assert len(working) == 0 and working.slab is None
