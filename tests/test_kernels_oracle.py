"""The float64 oracle and the random paged worlds that the kernel tests share, plus tests of the oracle itself.

The oracle is written independently of the reference kernels: it locates every token through the block table
one position at a time and computes softmax attention per query row in float64 on the CPU. Worlds are built
so that a kernel reading anything it should not gets NaN: the pool is NaN everywhere except the slots that
hold live tokens of the layer under test, and block-table entries past a sequence's last block hold an
out-of-range id.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ultra_adaptive_kv_cache_engine.kernels import PagedKV

LAYERS, LAYER = 3, 1  # worlds hold 3 layers; kernels read layer 1 (strided view, NaN neighbours)


@dataclass(frozen=True)
class World:
    """A paged batch: q_lens[b] new tokens at the end of seq_lens[b] tokens of sequence b."""

    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 24
    block_size: int = 16
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"L{list(self.seq_lens)}q{list(self.q_lens)}h{self.q_heads}/{self.kv_heads}d{self.head_dim}bs{self.block_size}{dt}"


@dataclass(frozen=True)
class Batch:
    """Tensors of a built world."""

    pool: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    query: Tensor
    query_start_loc: Tensor

    def kv(self, max_seq_len: int | None = None) -> PagedKV:
        return PagedKV.from_pool(self.pool, LAYER, self.block_tables, self.seq_lens, max_seq_len)


def build(world: World, seed: int, device: str = "cpu") -> Batch:
    """Random inputs for `world` (normal values, never zeros); see the module docstring for the poisoning."""
    gen = torch.Generator().manual_seed(seed)
    bs = world.block_size
    needed = [-(-n // bs) for n in world.seq_lens]
    width = max(needed) + 1
    num_blocks = sum(needed) + 3  # a few blocks no sequence uses
    shape = (num_blocks, LAYERS, 2, bs, world.kv_heads, world.head_dim)
    live = torch.randn(shape, generator=gen, dtype=torch.float64)
    pool = torch.full(shape, float("nan"), dtype=torch.float64)
    order = torch.randperm(num_blocks, generator=gen)
    tables = torch.full((len(world.seq_lens), width), num_blocks + 1000, dtype=torch.int32)
    used = 0
    for b, n in enumerate(world.seq_lens):
        ids = order[used : used + needed[b]]
        used += needed[b]
        tables[b, : needed[b]] = ids.int()
        for t in range(n):
            blk, off = int(ids[t // bs]), t % bs
            pool[blk, LAYER, :, off] = live[blk, LAYER, :, off]
    starts = [0]
    for q in world.q_lens:
        starts.append(starts[-1] + q)
    query = torch.randn((starts[-1], world.q_heads, world.head_dim), generator=gen, dtype=torch.float64)
    return Batch(
        pool.to(world.dtype).to(device),
        tables.to(device),
        torch.tensor(world.seq_lens, dtype=torch.int32, device=device),
        query.to(world.dtype).to(device),
        torch.tensor(starts, dtype=torch.int32, device=device),
    )


def oracle(batch: Batch, scale: float | None = None) -> Tensor:
    """float64 attention of every query row: row j of sequence b sits at position seq_len - q_len + j."""
    pool = batch.pool.detach().cpu().double()
    tables = batch.block_tables.cpu().tolist()
    lens = batch.seq_lens.cpu().tolist()
    starts = batch.query_start_loc.cpu().tolist()
    query = batch.query.detach().cpu().double()
    bs, kv_heads, dim = pool.shape[3], pool.shape[4], pool.shape[5]
    group = query.shape[1] // kv_heads
    scale = dim**-0.5 if scale is None else scale
    out = torch.zeros_like(query)
    for b, n in enumerate(lens):
        keys = torch.stack([pool[tables[b][t // bs], LAYER, 0, t % bs] for t in range(n)])  # (n, kv_heads, dim)
        values = torch.stack([pool[tables[b][t // bs], LAYER, 1, t % bs] for t in range(n)])
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        q_len = starts[b + 1] - starts[b]
        for j in range(q_len):
            pos = n - q_len + j
            row = query[starts[b] + j]  # (q_heads, dim)
            scores = torch.einsum("hd,thd->ht", row, keys[: pos + 1]) * scale
            probs = torch.softmax(scores, dim=-1)
            out[starts[b] + j] = torch.einsum("ht,thd->hd", probs, values[: pos + 1])
    return out


def tolerance(dtype: torch.dtype) -> float:
    """Relative error allowed against the float64 oracle: fp32 math 1e-3, half-precision operands 1e-2."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 1e-2


def assert_close_rel(actual: Tensor, expected: Tensor, tol: float) -> None:
    """Frobenius relative error below `tol`; fails on any NaN or infinity in `actual`."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert bool(torch.isfinite(actual).all()), "output holds NaN or infinity"
    err = float((actual - expected).norm() / expected.norm().clamp_min(1e-300))
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


def test_oracle_single_key_returns_its_value():
    world = World(seq_lens=(1,), q_lens=(1,), q_heads=2, kv_heads=1, head_dim=3, block_size=4)
    batch = build(world, seed=0)
    block = int(batch.block_tables[0, 0])
    expected = batch.pool[block, LAYER, 1, 0].double()  # (1, 3)
    assert torch.equal(oracle(batch), expected.expand(1, 2, 3))


def test_oracle_matches_hand_computed_softmax():
    world = World(seq_lens=(2,), q_lens=(1,), q_heads=1, kv_heads=1, head_dim=2, block_size=1)
    batch = build(world, seed=1)
    pool, tables = batch.pool.double(), batch.block_tables
    k = [pool[int(tables[0, t]), LAYER, 0, 0, 0] for t in range(2)]
    v = [pool[int(tables[0, t]), LAYER, 1, 0, 0] for t in range(2)]
    q = batch.query[0, 0].double()
    s = [float(q @ k[t]) / math.sqrt(2) for t in range(2)]
    w = [math.exp(x - max(s)) for x in s]
    expected = (w[0] * v[0] + w[1] * v[1]) / (w[0] + w[1])
    assert torch.allclose(oracle(batch)[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_oracle_is_causal_over_new_tokens():
    world = World(seq_lens=(5,), q_lens=(3,), q_heads=1, kv_heads=1, head_dim=4, block_size=2)
    batch = build(world, seed=2)
    first = oracle(batch)[0]
    # the first new token (position 2) sees positions 0..2 only: same answer with the last two tokens gone
    shorter = Batch(batch.pool, batch.block_tables, torch.tensor([3], dtype=torch.int32), batch.query[:1],
                    torch.tensor([0, 1], dtype=torch.int32))
    assert torch.equal(oracle(shorter)[0], first)


def test_worlds_poison_everything_but_live_tokens():
    world = World(seq_lens=(3, 17), q_lens=(1, 1), block_size=8)
    batch = build(world, seed=3)
    live = (~torch.isnan(batch.pool)).sum().item()
    assert live == (3 + 17) * 2 * world.kv_heads * world.head_dim
    assert int(batch.block_tables[0, 1]) >= batch.pool.shape[0]  # past the last block: out of range


def test_assert_close_rel_rejects_nan_and_large_errors():
    import pytest  # imported here: the helpers above also serve a standalone run without pytest

    ref = torch.ones(4, 2)
    with pytest.raises(AssertionError, match="NaN"):
        assert_close_rel(torch.full((4, 2), float("nan")), ref, 1e-2)
    with pytest.raises(AssertionError, match="relative error"):
        assert_close_rel(ref * 1.02, ref, 1e-2)
    assert_close_rel(ref * 1.005, ref, 1e-2)
