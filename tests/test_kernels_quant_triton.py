"""The Triton kernels over quantized pools against their reference twins and the float64 oracle: decode and
prefill attention reading sealed slabs and full-precision staging blocks (mixed tables, partial tails, GQA,
several block sizes, every pool format), and the seal kernel (quantize on write) against `PoolFormat.quantize`.

On CUDA (marked gpu), or on the CPU through Triton's interpreter when TRITON_INTERPRET=1 (tiny sizes; run with
--noconftest, as the conftest skips gpu tests without CUDA). The interpreter rounds float32 to bfloat16 by
truncation where a GPU rounds to nearest, so half-precision tolerances are doubled there.

Worlds: slabs of the layer under test are sealed by the reference quantiser from random KV, every other byte
of the pool is 0xFF (NaN as fp8 codes and as float16 scales), staging blocks are NaN except live slots, and
table entries past a sequence's end are out of range: a kernel reading anything it should not returns NaN.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

import pytest
import torch
from test_kernels_oracle import LAYER, LAYERS, Batch, assert_close_rel, oracle, tolerance

from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS, PoolFormat
from ultra_adaptive_kv_cache_engine.kernels import PagedKV, get_backend, plan_decode

ON_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (ON_CUDA or INTERPRETED), reason="needs CUDA (or TRITON_INTERPRET=1 with triton)"),
]
FORMATS = list(POOL_FORMATS)


@dataclass(frozen=True)
class QWorld:
    """q_lens[b] new tokens at the end of seq_lens[b] tokens; a sequence's last block and every
    `stage_every`-th block live in staging, the others in sealed slabs."""

    seq_lens: tuple[int, ...]
    q_lens: tuple[int, ...]
    q_heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16
    stage_every: int = 3

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"L{list(self.seq_lens)}q{list(self.q_lens)}h{self.q_heads}/{self.kv_heads}d{self.head_dim}"
                f"bs{self.block_size}{dt}")


@dataclass(frozen=True)
class QBatch:
    pool: torch.Tensor  # (N, LAYERS, 2, slab) uint8
    staging: torch.Tensor  # (S, LAYERS, 2, bs, H, D)
    batch: Batch  # the oracle's equivalent unquantized pool: dequantised slabs, then the staging blocks

    def kv(self, fmt: PoolFormat, device: str = DEVICE) -> PagedKV:
        b = self.batch
        return PagedKV.from_pools(self.pool.to(device), self.staging.to(device), LAYER, b.block_tables.to(device),
                                  b.seq_lens.to(device), fmt)


def build_quant(world: QWorld, fmt: PoolFormat, seed: int) -> QBatch:
    """A quantized paged world (see the module docstring); tensors on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    bs, heads, dim = world.block_size, world.kv_heads, world.head_dim
    sealed, staged = [], []
    for b, n in enumerate(world.seq_lens):
        count = -(-n // bs)
        for i in range(count):
            in_staging = i == count - 1 or i % world.stage_every == world.stage_every - 1
            (staged if in_staging else sealed).append((b, i))
    n_sealed, n_staging = len(sealed) + 2, len(staged) + 2
    pool = torch.full((n_sealed, LAYERS, 2, fmt.slab_bytes(bs, heads, dim)), 0xFF, dtype=torch.uint8)
    staging = torch.full((n_staging, LAYERS, 2, bs, heads, dim), float("nan"), dtype=world.dtype)
    equivalent = torch.full((n_sealed + n_staging, *staging.shape[1:]), float("nan"), dtype=torch.float64)
    width = max(-(-n // bs) for n in world.seq_lens) + 1
    tables = torch.full((len(world.seq_lens), width), n_sealed + n_staging + 1000, dtype=torch.int32)
    sealed_ids = torch.randperm(n_sealed, generator=gen).tolist()
    staging_ids = torch.randperm(n_staging, generator=gen).tolist()
    for b, i in sealed:
        blk = sealed_ids.pop()
        tables[b, i] = blk
        x = (torch.randn((2, 1, bs, heads, dim), generator=gen) * 2 + 0.3).to(world.dtype)
        for kv in range(2):
            pool[blk, LAYER, kv] = fmt.quantize(x[kv], kv == 0)[0]
    for kv in range(2):  # every slab at once (unused ones decode to NaN and are never read)
        slabs = pool[:, LAYER, kv]
        equivalent[:n_sealed, LAYER, kv] = fmt.dequantize(slabs, kv == 0, bs, heads, dim, world.dtype).double()
    for b, i in staged:
        s = staging_ids.pop()
        tables[b, i] = n_sealed + s
        live = min(bs, world.seq_lens[b] - i * bs)
        x = torch.randn((2, live, heads, dim), generator=gen).to(world.dtype)
        staging[s, LAYER, :, :live] = x
        equivalent[n_sealed + s, LAYER, :, :live] = x.double()
    starts = [0]
    for q in world.q_lens:
        starts.append(starts[-1] + q)
    query = torch.randn((starts[-1], world.q_heads, dim), generator=gen).to(world.dtype)
    batch = Batch(equivalent, tables, torch.tensor(world.seq_lens, dtype=torch.int32), query,
                  torch.tensor(starts, dtype=torch.int32))
    return QBatch(pool, staging, batch)


def qtolerance(dtype: torch.dtype) -> float:
    half = dtype in (torch.float16, torch.bfloat16)
    return tolerance(dtype) * (2 if half and not ON_CUDA else 1)


def _triton():
    return get_backend("triton")


def _check_against_twins(out: torch.Tensor, qb: QBatch, fmt: PoolFormat, world: QWorld, prefill: bool) -> None:
    """`out` within tolerance of the float64 oracle and of the reference kernel (on the CPU, same dtype)."""
    tol = qtolerance(world.dtype)
    assert_close_rel(out, oracle(qb.batch), tol)
    kv, q = qb.kv(fmt, "cpu"), qb.batch.query
    ref = get_backend("reference")
    expected = (ref.prefill_attention(q, qb.batch.query_start_loc, kv) if prefill else ref.decode_attention(q, kv))
    assert_close_rel(out, expected, tol)


DECODE_WORLDS = [
    QWorld(seq_lens=(37, 16, 70), q_lens=(1, 1, 1)),  # GQA 2, bf16, tails and every third block staged
    QWorld(seq_lens=(23, 9, 41), q_lens=(1, 1, 1), q_heads=3, kv_heads=3, head_dim=12, block_size=5,
           dtype=torch.float32),  # odd block size, int2 parameters at odd offsets, tiles straddling blocks
    QWorld(seq_lens=(150, 5), q_lens=(1, 1), q_heads=8, kv_heads=1, head_dim=64, block_size=32,
           dtype=torch.float16, stage_every=2),
]
LARGE_DECODE = [
    QWorld(seq_lens=(4000, 1, 1037, 2048), q_lens=(1,) * 4, q_heads=32, kv_heads=8, head_dim=128, block_size=bs,
           dtype=torch.bfloat16, stage_every=50)
    for bs in (16, 64)
]


@pytest.mark.parametrize("world", DECODE_WORLDS + (LARGE_DECODE if ON_CUDA else []), ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_decode_reads_slabs_and_staging_like_the_reference(name: str, world: QWorld):
    fmt = POOL_FORMATS[name]
    qb = build_quant(world, fmt, seed=41)
    out = torch.full(qb.batch.query.shape, float("nan"), dtype=world.dtype, device=DEVICE)
    assert _triton().decode_attention(qb.batch.query.to(DEVICE), qb.kv(fmt), out=out) is out
    _check_against_twins(out, qb, fmt, world, prefill=False)


@pytest.mark.parametrize("launch", [(5, 16, 1), (5, 16, 3), (16, 64, 2), (16, 16, 1), (32, 16, 4)], ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_decode_tiles_and_splits_over_mixed_blocks(name: str, launch: tuple[int, int, int]):
    """Tiles of 16 keys over 5-token blocks (straddling sealed and staged ones), tiles of several blocks, a
    block larger than a tile, split partitions: all the same attention."""
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    block_size, block_n, splits = launch
    fmt = POOL_FORMATS[name]
    world = QWorld(seq_lens=(97, 1, 64, 40), q_lens=(1,) * 4, q_heads=8, kv_heads=2, head_dim=16,
                   block_size=block_size, dtype=torch.float32, stage_every=2)
    qb = build_quant(world, fmt, seed=42)
    kv = qb.kv(fmt)
    plan = plan_decode(kv.decode_shape(qb.batch.query), num_sms=132, num_splits=splits, block_n=block_n)
    out = triton_decode_attention(qb.batch.query.to(DEVICE), kv, launch=plan)
    _check_against_twins(out, qb, fmt, world, prefill=False)


def test_fp8_kernel_and_its_switches_agree():
    """fp8 views take triton_token_decode's kernel (the other formats the generic QUANT kernel); with its scale
    prefetch off, and through the generic kernel, the same attention (split and not)."""
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import _launch_partitions
    from ultra_adaptive_kv_cache_engine.kernels.triton_token_decode import token_scaled

    fmt = POOL_FORMATS["fp8"]
    world = QWorld(seq_lens=(97, 1, 64, 40), q_lens=(1,) * 4, q_heads=8, kv_heads=2, head_dim=16,
                   block_size=5, dtype=torch.float32, stage_every=2)
    qb = build_quant(world, fmt, seed=45)
    kv, query = qb.kv(fmt), qb.batch.query.to(DEVICE)
    assert token_scaled(kv)
    for other in ("int8", "int4", "int2"):
        assert not token_scaled(build_quant(world, POOL_FORMATS[other], seed=45).kv(POOL_FORMATS[other]))
    for splits in (1, 3):
        plan = plan_decode(kv.decode_shape(query), num_sms=132, num_splits=splits, block_n=16)
        outs = []
        for switches in ({}, {"prefetch": False}, {"specialised": False}):
            out = torch.full(query.shape, float("nan"), dtype=world.dtype, device=DEVICE)
            _launch_partitions(query, kv, out, plan, 4, world.head_dim**-0.5, **switches)
            outs.append(out)
        _check_against_twins(outs[0], qb, fmt, world, prefill=False)
        assert torch.equal(outs[1], outs[0])  # the same arithmetic, only the loads move
        assert_close_rel(outs[2], outs[0], qtolerance(world.dtype))


PREFILL_WORLDS = [
    QWorld(seq_lens=(30, 17, 9), q_lens=(14, 0, 9), head_dim=16, block_size=8, dtype=torch.float32),
    QWorld(seq_lens=(70, 40), q_lens=(3, 40), q_heads=6, kv_heads=2, head_dim=40, block_size=16, stage_every=2),
]
LARGE_PREFILL = [
    QWorld(seq_lens=(1500, 700, 64), q_lens=(300, 700, 1), q_heads=32, kv_heads=8, head_dim=128, block_size=bs,
           stage_every=7)
    for bs in (16, 128)
]


@pytest.mark.parametrize("world", PREFILL_WORLDS + (LARGE_PREFILL if ON_CUDA else []), ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_prefill_reads_slabs_and_staging_like_the_reference(name: str, world: QWorld):
    fmt = POOL_FORMATS[name]
    qb = build_quant(world, fmt, seed=43)
    out = torch.full(qb.batch.query.shape, float("nan"), dtype=world.dtype, device=DEVICE)
    _triton().prefill_attention(qb.batch.query.to(DEVICE), qb.batch.query_start_loc.to(DEVICE), qb.kv(fmt), out=out)
    _check_against_twins(out, qb, fmt, world, prefill=True)


def test_a_format_without_a_kernel_is_refused_by_name():
    fmt = dataclasses.replace(POOL_FORMATS["int4"], name="int3")
    qb = build_quant(QWorld(seq_lens=(20,), q_lens=(1,)), POOL_FORMATS["int4"], seed=44)
    with pytest.raises(ValueError, match="pool format 'int3' has no Triton kernel; expected one of: fp8, int8"):
        _triton().decode_attention(qb.batch.query.to(DEVICE), qb.kv(fmt))


def _seal_inputs(shape: tuple[int, int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Staging (4, LAYERS, 2, bs, H, D) with magnitudes from 2**-12 to 2**6 (fp8 subnormals after scaling),
    one constant token row and one constant key channel (scales of 0, stored as 1)."""
    gen = torch.Generator().manual_seed(seed)
    bs, heads, dim = shape
    full = (LAYERS * 2 * bs * heads, dim)
    x = torch.randn(full, generator=gen) * torch.exp2(torch.randint(-12, 7, full, generator=gen).float())
    x = x.view(1, LAYERS, 2, bs, heads, dim).repeat(4, 1, 1, 1, 1, 1) * torch.arange(1, 5).view(4, 1, 1, 1, 1, 1)
    x[:, :, :, 0, 0, :] = 0.75
    x[:, :, 0, :, heads - 1, 1] = -2.5
    return x.to(dtype)


SEAL_SHAPES = [((16, 2, 32), torch.bfloat16), ((5, 3, 12), torch.float32), ((16, 8, 128), torch.float16)]


@pytest.mark.parametrize("shape", SEAL_SHAPES, ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_seal_is_bit_identical_to_the_reference_quantiser(name: str, shape: tuple[tuple[int, int, int], torch.dtype]):
    (bs, heads, dim), dtype = shape
    fmt = POOL_FORMATS[name]
    staging = _seal_inputs((bs, heads, dim), dtype, seed=45).to(DEVICE)
    before = staging.clone()
    pool = torch.full((6, LAYERS, 2, fmt.slab_bytes(bs, heads, dim)), 7, dtype=torch.uint8, device=DEVICE)
    _triton().seal_blocks(staging, torch.tensor([3, 0, 2], device=DEVICE), pool,
                          torch.tensor([5, 1, 2], dtype=torch.int32, device=DEVICE), fmt)
    for src, dst in ((3, 5), (0, 1), (2, 2)):
        for layer in range(LAYERS):
            for kv in range(2):
                expected = fmt.quantize(staging[src, layer, kv][None].cpu(), kv == 0)[0]
                assert torch.equal(pool[dst, layer, kv].cpu(), expected), (src, layer, kv)
    assert bool((pool[[0, 3, 4]] == 7).all()) and torch.equal(staging, before)  # nothing else written


def test_seal_of_an_odd_parameter_offset_and_ids_out_of_range():
    """int4 over head_dim 18 (parameters at an odd byte): bit-identical; ids out of range write nothing."""
    fmt = POOL_FORMATS["int4"]
    staging = _seal_inputs((3, 1, 18), torch.float32, seed=46).to(DEVICE)
    pool = torch.full((3, LAYERS, 2, fmt.slab_bytes(3, 1, 18)), 7, dtype=torch.uint8, device=DEVICE)
    _triton().seal_blocks(staging, torch.tensor([1, 9, 0], device=DEVICE), pool,
                          torch.tensor([2, 0, -1], device=DEVICE), fmt)
    for layer in range(LAYERS):
        for kv in range(2):
            expected = fmt.quantize(staging[1, layer, kv][None].cpu(), kv == 0)[0]
            assert torch.equal(pool[2, layer, kv].cpu(), expected)
    assert bool((pool[:2] == 7).all())


def test_seal_refuses_bad_inputs_by_name():
    fmt = POOL_FORMATS["int8"]
    staging = torch.zeros((2, LAYERS, 2, 4, 1, 32), device=DEVICE)
    pool = torch.zeros((3, LAYERS, 2, fmt.slab_bytes(4, 1, 32)), dtype=torch.uint8, device=DEVICE)
    ids = torch.tensor([0], device=DEVICE)
    with pytest.raises(ValueError, match="pool has shape"):
        _triton().seal_blocks(staging, ids, pool, ids, POOL_FORMATS["int2"])
    with pytest.raises(ValueError, match="the Triton seal takes float16, bfloat16 or float32"):
        _triton().seal_blocks(staging.double(), ids, pool, ids, fmt)
    with pytest.raises(ValueError, match="pool format 'int3' has no Triton kernel"):
        _triton().seal_blocks(staging, ids, pool, ids, dataclasses.replace(fmt, name="int3"))


def test_the_triton_backend_seals_with_the_triton_kernel():
    from ultra_adaptive_kv_cache_engine.kernels.triton_seal import triton_seal_blocks

    assert _triton().seal_blocks is triton_seal_blocks
