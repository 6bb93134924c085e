"""Paged attention over quantized pools (reference kernels, CPU) and quantize on write (`seal_blocks`).

A quantized world: a uint8 pool of slabs (every block sealed from random KV) and full-precision staging blocks
(NaN except the live slots); block tables mix sealed entries (< N) and staging ones (>= N). The float64 oracle
sees one unquantized pool: the slabs dequantised with `PoolFormat.dequantize`, followed by the staging blocks,
so a table entry names the same block in both.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_oracle import LAYER, LAYERS, Batch, assert_close_rel, oracle

from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS, PoolFormat
from ultra_adaptive_kv_cache_engine.kernels import (
    PagedKV,
    QuantBlocks,
    get_backend,
    reference_decode_attention,
    reference_prefill_attention,
    reference_seal_blocks,
)

FORMATS = list(POOL_FORMATS)
BS, HEADS, DIM = 8, 2, 16


def quant_world(fmt: PoolFormat, seq_lens: tuple[int, ...], q_lens: tuple[int, ...], staged: tuple[set[int], ...],
                dtype: torch.dtype = torch.float32, seed: int = 0, q_heads: int = 4):
    """(pool, staging, batch of the oracle's equivalent pool): sequence b's logical blocks in `staged[b]` live
    in staging, the others in sealed slabs."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // BS) for n in seq_lens]
    n_sealed = sum(len(range(k)) - len(s) for k, s in zip(needed, staged, strict=True)) + 2
    n_staging = sum(len(s) for s in staged) + 2
    full = torch.randn((n_sealed, LAYERS, 2, BS, HEADS, DIM), generator=gen) * 2
    slab = fmt.slab_bytes(BS, HEADS, DIM)
    pool = torch.zeros((n_sealed, LAYERS, 2, slab), dtype=torch.uint8)
    reference_seal_blocks(full.to(dtype), torch.arange(n_sealed), pool, torch.arange(n_sealed), fmt)
    staging = torch.full((n_staging, LAYERS, 2, BS, HEADS, DIM), float("nan"), dtype=dtype)
    live = torch.randn(staging.shape, generator=gen).to(dtype)
    sealed_order = torch.randperm(n_sealed, generator=gen).tolist()
    staging_order = torch.randperm(n_staging, generator=gen).tolist()
    tables = torch.full((len(seq_lens), max(needed) + 1), 10_000, dtype=torch.int32)
    for b, n in enumerate(seq_lens):
        for i in range(needed[b]):
            if i in staged[b]:
                s = staging_order.pop()
                tables[b, i] = n_sealed + s
                used = min(BS, n - i * BS)
                staging[s, LAYER, :, :used] = live[s, LAYER, :, :used]
            else:
                tables[b, i] = sealed_order.pop()
    dequant = torch.stack([
        torch.stack([fmt.dequantize(pool[:, layer, kv], kv == 0, BS, HEADS, DIM, torch.float64)
                     for kv in range(2)], dim=1) for layer in range(LAYERS)], dim=1)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    query = torch.randn((starts[-1], q_heads, DIM), generator=gen).to(dtype)
    equivalent = torch.cat([dequant, staging.double()])
    batch = Batch(equivalent, tables, torch.tensor(seq_lens, dtype=torch.int32), query,
                  torch.tensor(starts, dtype=torch.int32))
    return pool, staging, batch


def _kv(pool, staging, batch, fmt) -> PagedKV:
    return PagedKV.from_pools(pool, staging, LAYER, batch.block_tables, batch.seq_lens, fmt)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_over_sealed_and_staged_blocks_matches_the_oracle(name, dtype):
    fmt = POOL_FORMATS[name]
    pool, staging, batch = quant_world(fmt, (21, 8, 40), (1, 1, 1), ({2}, {0}, {1, 4}), dtype, seed=1)
    kv = _kv(pool, staging, batch, fmt)
    assert kv.quant is not None and kv.num_table_entries == pool.shape[0] + staging.shape[0]
    out = reference_decode_attention(batch.query, kv)
    assert_close_rel(out, oracle(batch), 1e-3 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("name", FORMATS)
def test_prefill_over_sealed_and_staged_blocks_matches_the_oracle(name):
    fmt = POOL_FORMATS[name]
    pool, staging, batch = quant_world(fmt, (30, 17, 9), (14, 0, 9), ({2, 3}, set(), {0, 1}), seed=2)
    out = reference_prefill_attention(batch.query, batch.query_start_loc, _kv(pool, staging, batch, fmt))
    assert_close_rel(out, oracle(batch), 1e-3)


def test_a_checked_view_skips_the_value_checks_and_for_layer_keeps_them():
    fmt = POOL_FORMATS["int4"]
    pool, staging, batch = quant_world(fmt, (21, 8), (1, 1), ({2}, set()), seed=3)
    kv = PagedKV.from_pools(pool, staging, 0, batch.block_tables, batch.seq_lens, fmt).checked()
    assert kv.checked_lens == (21, 8)
    layer = kv.for_layer(staging[:, LAYER, 0], staging[:, LAYER, 1],
                         QuantBlocks(fmt, pool[:, LAYER, 0], pool[:, LAYER, 1]))
    assert layer.checked_lens == (21, 8) and layer.quant.key_slabs.data_ptr() == pool[:, LAYER, 0].data_ptr()
    assert_close_rel(reference_decode_attention(batch.query, layer), oracle(batch), 1e-3)
    assert get_backend("reference").prepare(_kv(pool, staging, batch, fmt)).checked_lens == (21, 8)


def test_checks_name_a_staging_entry_out_of_range():
    fmt = POOL_FORMATS["int8"]
    pool, staging, batch = quant_world(fmt, (21,), (1,), ({2},), seed=4)
    limit = pool.shape[0] + staging.shape[0]
    batch.block_tables[0, 2] = limit
    with pytest.raises(ValueError, match=rf"block_tables\[0, 2\]={limit} is not a block id in \[0, {limit}\)"):
        reference_decode_attention(batch.query, _kv(pool, staging, batch, fmt))


def test_paged_kv_rejects_slabs_of_another_format_or_device():
    fmt = POOL_FORMATS["int4"]
    pool, staging, batch = quant_world(fmt, (9,), (1,), (set(),), seed=5)
    with pytest.raises(ValueError, match="pool format 'int2' stores a block of 8 tokens x 2 heads x 16 in"):
        PagedKV.from_pools(pool, staging, 0, batch.block_tables, batch.seq_lens, POOL_FORMATS["int2"])
    with pytest.raises(ValueError, match="key_slabs has dtype torch.float32"):
        QuantBlocks(fmt, pool[:, 0, 0].float(), pool[:, 0, 1].float())
    with pytest.raises(TypeError, match="must be a PoolFormat"):
        QuantBlocks("int4", pool[:, 0, 0], pool[:, 0, 1])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", FORMATS)
def test_seal_blocks_quantizes_every_layer_k_and_v_into_the_named_blocks(name):
    fmt = POOL_FORMATS[name]
    gen = torch.Generator().manual_seed(6)
    staging = torch.randn((4, LAYERS, 2, BS, HEADS, DIM), generator=gen).to(torch.bfloat16)
    pool = torch.full((5, LAYERS, 2, fmt.slab_bytes(BS, HEADS, DIM)), 7, dtype=torch.uint8)
    before = staging.clone()
    reference_seal_blocks(staging, torch.tensor([3, 1]), pool, torch.tensor([0, 4]), fmt)
    for src, dst in ((3, 0), (1, 4)):
        for layer in range(LAYERS):
            assert torch.equal(pool[dst, layer, 0], fmt.quantize(staging[src, layer, 0][None], True)[0])
            assert torch.equal(pool[dst, layer, 1], fmt.quantize(staging[src, layer, 1][None], False)[0])
    assert bool((pool[1:4] == 7).all()) and torch.equal(staging, before)  # nothing else written


def test_seal_blocks_rejects_bad_ids_and_shapes():
    fmt = POOL_FORMATS["int8"]
    staging = torch.zeros((2, LAYERS, 2, BS, HEADS, DIM))
    pool = torch.zeros((3, LAYERS, 2, fmt.slab_bytes(BS, HEADS, DIM)), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"block_ids\[0\]=3 is not a block id in \[0, 3\)"):
        reference_seal_blocks(staging, torch.tensor([0]), pool, torch.tensor([3]), fmt)
    with pytest.raises(ValueError, match="holds a block twice"):
        reference_seal_blocks(staging, torch.tensor([0, 1]), pool, torch.tensor([2, 2]), fmt)
    with pytest.raises(ValueError, match=r"staging_ids\[0\]=2 is not a block id in \[0, 2\)"):
        reference_seal_blocks(staging, torch.tensor([2]), pool, torch.tensor([1]), fmt)
    with pytest.raises(ValueError, match="pool has shape"):
        reference_seal_blocks(staging, torch.tensor([0]), pool, torch.tensor([1]), POOL_FORMATS["int4"])
    with pytest.raises(ValueError, match="staging_ids has 2 ids but block_ids has 1"):
        reference_seal_blocks(staging, torch.tensor([0, 1]), pool, torch.tensor([1]), fmt)
