"""The Triton kernels against the float64 oracle and the reference: on CUDA (marked gpu), or on the CPU through
Triton's interpreter when TRITON_INTERPRET=1 (tiny sizes; run with --noconftest if a conftest skips gpu tests).

Also runnable without pytest: ``python3 tests/test_kernels_triton.py`` runs every case and prints one JSON
line with the counts (for machines that have torch and triton but no pytest).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from test_kernels_oracle import LAYER, Batch, World, assert_close_rel, build, oracle, tolerance

from ultra_adaptive_kv_cache_engine.kernels import (
    BlockTransfer,
    DecodeShape,
    PagedKV,
    get_backend,
    plan_decode,
)

try:
    import pytest
except ModuleNotFoundError:  # standalone run, see __main__
    pytest = None

ON_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if ON_CUDA else "cpu"
if pytest is not None:
    pytestmark = [
        pytest.mark.gpu,
        pytest.mark.skipif(not (ON_CUDA or INTERPRETED), reason="needs CUDA (or TRITON_INTERPRET=1 with triton)"),
    ]


def cases(name: str, values: list[Any]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """pytest.mark.parametrize when pytest is there; the values are also kept for the standalone runner."""

    def mark(fn: Callable[..., None]) -> Callable[..., None]:
        fn.cases = (name, values)  # type: ignore[attr-defined]
        return pytest.mark.parametrize(name, values, ids=str)(fn) if pytest is not None else fn

    return mark


HALF = [torch.float16, torch.bfloat16]
SMALL_DECODE = [
    World(seq_lens=(1, 16, 37), q_lens=(1, 1, 1), dtype=dt) for dt in [torch.float32, *HALF]
] + [
    World(seq_lens=(33, 64, 2), q_lens=(1, 1, 1), q_heads=3, kv_heads=3, head_dim=17, block_size=5),
    World(seq_lens=(150, 5), q_lens=(1, 1), q_heads=8, kv_heads=2, head_dim=40, block_size=128, dtype=torch.bfloat16),
]
LARGE_DECODE = [
    World(seq_lens=(4000, 1, 1037, 2048), q_lens=(1,) * 4, q_heads=32, kv_heads=8, head_dim=128, block_size=bs,
          dtype=dt)
    for bs, dt in ((16, torch.bfloat16), (64, torch.float16), (128, torch.bfloat16))
] + [World(seq_lens=(3000, 77), q_lens=(1, 1), q_heads=28, kv_heads=4, head_dim=96, block_size=32)]
DECODE_WORLDS = SMALL_DECODE + (LARGE_DECODE if ON_CUDA else [])
SPLITS = [1, 3, 64]

SMALL_PREFILL = [
    World(seq_lens=(20, 37, 5), q_lens=(20, 7, 1), dtype=dt) for dt in [torch.float32, *HALF]
] + [World(seq_lens=(70, 9, 40), q_lens=(3, 0, 40), q_heads=6, kv_heads=2, head_dim=40, block_size=16)]
LARGE_PREFILL = [
    World(seq_lens=(1500, 700, 64), q_lens=(300, 700, 1), q_heads=32, kv_heads=8, head_dim=128, block_size=bs,
          dtype=torch.bfloat16)
    for bs in (16, 128)
] + [World(seq_lens=(513, 1000), q_lens=(129, 33), q_heads=12, kv_heads=12, head_dim=64, block_size=64,
           dtype=torch.float16)]
PREFILL_WORLDS = SMALL_PREFILL + (LARGE_PREFILL if ON_CUDA else [])


def _triton():
    return get_backend("triton")


def _on_cpu(batch: Batch) -> Batch:
    return Batch(*(getattr(batch, f.name).cpu() for f in dataclasses.fields(batch)))


@cases("world", DECODE_WORLDS)
def test_decode_matches_oracle(world: World):
    batch = build(world, seed=31, device=DEVICE)
    out = torch.full_like(batch.query, float("nan"))
    assert _triton().decode_attention(batch.query, batch.kv(), out=out) is out
    assert_close_rel(out, oracle(batch), tolerance(world.dtype))
    cpu = _on_cpu(batch)  # and against its reference twin, in the same dtype
    assert_close_rel(out, get_backend("reference").decode_attention(cpu.query, cpu.kv()), tolerance(world.dtype))


@cases("splits", SPLITS)
def test_decode_split_counts_agree(splits: int):
    world = World(seq_lens=(300, 1, 64, 129), q_lens=(1,) * 4, q_heads=8, kv_heads=2, head_dim=32, block_size=16)
    batch = build(world, seed=32, device=DEVICE)
    kv = batch.kv()
    plan = plan_decode(DecodeShape(4, 2, 4, 32, kv.max_len_bound), num_sms=132, num_splits=splits, block_n=16)
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    out = torch.full_like(batch.query, float("nan"))
    triton_decode_attention(batch.query, kv, out=out, launch=plan)
    assert_close_rel(out, oracle(batch), tolerance(world.dtype))


@cases("order", [(bs, bn, splits, first) for bs, bn, splits in ((16, 64, 1), (16, 32, 3), (5, 16, 2))
                  for first in (True, False)])
def test_decode_grid_orders_and_tiles_over_several_blocks_agree(order: tuple[int, int, int, bool]):
    """Tiles of 2 or 4 blocks of 16 tokens (and 16-key tiles over 5-token blocks, straddling them), both grid
    orders: the same attention, within the dtype's tolerance of the oracle."""
    block_size, block_n, splits, heads_first = order
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    world = World(seq_lens=(150, 1, 64, 97), q_lens=(1,) * 4, q_heads=8, kv_heads=2, head_dim=32,
                  block_size=block_size, dtype=torch.bfloat16)
    batch = build(world, seed=34, device=DEVICE)
    kv = batch.kv()
    plan = plan_decode(kv.decode_shape(batch.query), num_sms=132, num_splits=splits, block_n=block_n)
    plan = dataclasses.replace(plan, heads_first=heads_first)
    out = triton_decode_attention(batch.query, kv, launch=plan)
    assert_close_rel(out, oracle(batch), tolerance(world.dtype))


@cases("splits", [1, 2])
def test_decode_with_tight_length_hint_and_empty_sequence(splits: int):
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    world = World(seq_lens=(40, 9), q_lens=(1, 1), dtype=torch.bfloat16)
    batch = build(world, seed=33, device=DEVICE)
    plan = plan_decode(DecodeShape(2, 2, 2, 24, 40), num_sms=132, num_splits=splits, block_n=16)
    out = triton_decode_attention(batch.query, batch.kv(max_seq_len=40), launch=plan)
    assert_close_rel(out, oracle(batch), tolerance(world.dtype))
    lens = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    empty = PagedKV.from_pool(batch.pool, LAYER, batch.block_tables, lens, max_seq_len=40)
    zeros = triton_decode_attention(batch.query, empty, launch=plan)
    assert torch.equal(zeros[0].float().cpu(), torch.zeros(4, 24))
    assert_close_rel(zeros[1], oracle(batch)[1], tolerance(world.dtype))  # sequence 1 is untouched by 0


def test_decode_rejects_a_launch_that_does_not_cover_the_shape():
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    batch = build(World(seq_lens=(40, 9), q_lens=(1, 1)), seed=38, device=DEVICE)
    plan = plan_decode(DecodeShape(2, 2, 2, 24, 64), num_sms=132, num_splits=2, block_n=16)
    for bad in (dataclasses.replace(plan, num_splits=1), dataclasses.replace(plan, block_d=16)):
        try:
            triton_decode_attention(batch.query, batch.kv(), launch=bad)
        except ValueError as exc:
            assert "does not cover" in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")


@cases("world", PREFILL_WORLDS)
def test_prefill_matches_oracle(world: World):
    batch = build(world, seed=34, device=DEVICE)
    out = torch.full_like(batch.query, float("nan"))
    _triton().prefill_attention(batch.query, batch.query_start_loc, batch.kv(), out=out)
    assert_close_rel(out, oracle(batch), tolerance(world.dtype))
    cpu = _on_cpu(batch)
    reference = get_backend("reference").prefill_attention(cpu.query, cpu.query_start_loc, cpu.kv())
    assert_close_rel(out, reference, tolerance(world.dtype))


@cases("dtype", [torch.float32, *HALF])
def test_write_kv_equals_reference_bit_for_bit(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(35)
    pool = torch.randn((9, 3, 2, 5, 3, 40), generator=gen).to(dtype)
    slots = torch.randperm(45, generator=gen)[:17]
    key = torch.randn((17, 3, 40), generator=gen).to(dtype)
    value = torch.randn((17, 3, 40), generator=gen).to(dtype)
    expected = pool.clone()
    get_backend("reference").write_kv(key, value, expected[:, 2, 0], expected[:, 2, 1], slots)
    pool, key, value, slots = pool.to(DEVICE), key.to(DEVICE), value.to(DEVICE), slots.to(DEVICE)
    _triton().write_kv(key, value, pool[:, 2, 0], pool[:, 2, 1], slots.int())
    assert torch.equal(pool.cpu(), expected)


def test_write_kv_skips_out_of_range_slots():
    pool = torch.randn((2, 1, 2, 4, 1, 8), device=DEVICE)
    before = pool.clone()
    key = value = torch.randn((3, 1, 8), device=DEVICE)
    _triton().write_kv(key, value, pool[:, 0, 0], pool[:, 0, 1], torch.tensor([-1, 8, 3], device=DEVICE))
    before[0, 0, :, 3] = key[2]
    assert torch.equal(pool, before)


@cases("dtype", [torch.float32, *HALF])
def test_gather_and_scatter_equal_reference_bit_for_bit(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(36)
    pool = torch.randn((11, 2, 2, 16, 2, 24), generator=gen).to(dtype).to(DEVICE)
    ids = torch.tensor([10, 0, 5, 5, 3], dtype=torch.int32, device=DEVICE)
    out = torch.full((5, *pool.shape[1:]), float("nan"), dtype=dtype, device=DEVICE)
    _triton().gather_blocks(pool, ids, out)
    assert torch.equal(out, pool[ids.long()])
    staging = torch.randn((3, *pool.shape[1:]), generator=gen).to(dtype).to(DEVICE)
    expected = pool.clone()
    expected[[9, 1, 4]] = staging
    _triton().scatter_blocks(staging, pool, torch.tensor([9, 1, 4], device=DEVICE))
    assert torch.equal(pool, expected)


def test_block_transfer_round_trip_in_chunks():
    gen = torch.Generator().manual_seed(37)
    pool = torch.randn((20, 2, 2, 16, 2, 8), generator=gen).to(torch.bfloat16).to(DEVICE)
    transfer = BlockTransfer(pool, max_blocks=3, backend=_triton())
    ids = [19, 2, 7, 11, 0, 5, 13]
    host = transfer.to_host(ids)
    assert host.device.type == "cpu" and host.is_pinned() == ON_CUDA
    assert torch.equal(host, pool.cpu()[ids])
    fresh = torch.randn(host.shape, generator=gen).to(torch.bfloat16)
    expected = pool.cpu()
    expected[[1, 3, 4, 6, 8, 9, 10]] = fresh
    transfer.from_host(fresh, [1, 3, 4, 6, 8, 9, 10])
    assert torch.equal(pool.cpu(), expected)


def _run_standalone() -> int:
    """Run every test of this module without pytest; print one JSON line; return the process exit code."""
    import json
    import traceback

    if not (ON_CUDA or INTERPRETED):
        print(json.dumps({"tests": "triton", "skipped": "needs CUDA or TRITON_INTERPRET=1"}))
        return 0
    passed, failed = 0, []
    for name, fn in sorted((n, f) for n, f in globals().items() if n.startswith("test_") and callable(f)):
        arg, values = getattr(fn, "cases", (None, [None]))
        for value in values:
            label = f"{name}[{value}]" if arg else name
            try:
                fn(**({arg: value} if arg else {}))
                passed += 1
            except Exception:  # report every failure, keep going
                failed.append(label)
                traceback.print_exc(file=sys.stderr)
    print(json.dumps({"tests": "triton", "device": DEVICE, "passed": passed, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_run_standalone())
