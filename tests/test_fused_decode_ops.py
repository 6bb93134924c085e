"""The fused decode ops (`kernels.fused_decode_ops`) against their PyTorch twin.

On every machine: the registry, and the "torch" ops' decode equal to the shared layer's (the former path).
Kernels: on CUDA (marked gpu), or on the CPU through Triton's interpreter when TRITON_INTERPRET=1 with triton
(tiny sizes, float32 and float16). The model-level comparisons and a captured step need CUDA.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from ultra_adaptive_kv_cache_engine.kernels import get_backend
from ultra_adaptive_kv_cache_engine.kernels.fused_decode_ops import (
    DECODE_OPS,
    get_decode_ops,
    select_decode_ops,
)
from ultra_adaptive_kv_cache_engine.model.decode_step import DecodeStep
from ultra_adaptive_kv_cache_engine.model.paged_llama import DecodeInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

ON_CUDA = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if ON_CUDA else "cpu"
KERNELS = pytest.mark.skipif(not (ON_CUDA or INTERPRETED), reason="needs CUDA (or TRITON_INTERPRET=1 with triton)")
GPU = pytest.mark.skipif(not ON_CUDA, reason="needs CUDA and triton")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
WRITE = get_backend("reference").write_kv


def _rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_an_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="expected one of: torch, triton, triton_cublas"):
        get_decode_ops("fused", WRITE)
    assert sorted(DECODE_OPS) == ["torch", "triton", "triton_cublas"]
    assert select_decode_ops("cpu", WRITE).name == "torch"


def _decode_world(model: PagedLlama, batch: int, seed: int) -> tuple[torch.Tensor, DecodeInputs]:
    s, bs = model.shape, 4
    pool = _rand((40, s.num_layers, 2, bs, s.num_kv_heads, s.head_dim), seed, model.dtype)
    tables = torch.randperm(40, generator=torch.Generator().manual_seed(seed))[: batch * 8].view(batch, 8)
    positions = torch.tensor([3 + 6 * b for b in range(batch)], dtype=torch.int64)  # below 8 blocks of 4
    ids = torch.randint(3, 300, (batch,), generator=torch.Generator().manual_seed(seed))
    return pool, DecodeInputs(ids.to(DEVICE), positions.to(DEVICE), tables.to(DEVICE, torch.int32))


def test_the_torch_ops_decode_as_the_shared_layer_did():
    model = PagedLlama.from_hf(build_tiny_llama(TinyLlamaSpec(), DEVICE).model).with_decode_ops("torch")
    former = copy.copy(model)
    former.decode_ops = None  # the shared layer, the path before the decode ops
    pool, inputs = _decode_world(model, 3, seed=4)
    pool2 = pool.clone()
    assert torch.equal(model.decode(pool, inputs), former.decode(pool2, inputs))
    assert torch.equal(pool, pool2)  # the same keys and values stored in the same slots


def test_a_model_with_biases_decodes_through_the_shared_layer():
    lm = build_tiny_llama(TinyLlamaSpec(), "cpu").model
    sd = dict(lm.state_dict())
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    model = PagedLlama.from_state_dict(sd, lm.config)
    assert model.decode_ops is None
    with pytest.raises(ValueError, match="biases"):
        model.with_decode_ops("torch")


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", [1, 3])
def test_rope_and_kv_store_equal_the_formula(dtype, tokens):
    from ultra_adaptive_kv_cache_engine.kernels.triton_fused_rope_kv import triton_rope_write_kv

    heads, kv_heads, dim, bs = 4, 2, 16, 4
    qkv = _rand((tokens, (heads + 2 * kv_heads) * dim), 1, dtype)
    angles = _rand((tokens, dim // 2), 2, torch.float32, 3.0).repeat(1, 2)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    pool = _rand((6, 2, 2, bs, kv_heads, dim), 3, dtype)
    slots = torch.tensor([9, 2, 17][:tokens], device=DEVICE)
    want = pool.clone()
    q_want = get_decode_ops("torch", WRITE).rope_write_kv(qkv, cos, sin, heads, kv_heads, want[:, 1, 0],
                                                           want[:, 1, 1], slots)
    q = triton_rope_write_kv(qkv, cos, sin, heads, kv_heads, pool[:, 1, 0], pool[:, 1, 1], slots)
    # within one rounding of the formula (the compiler may contract a product and the sum into one FMA)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert q.shape == (tokens, heads, dim)
    torch.testing.assert_close(q, q_want, rtol=tol, atol=tol)
    torch.testing.assert_close(pool[:, 1, 0], want[:, 1, 0], rtol=tol, atol=tol)  # rotated keys in their slots
    keys = pool[:, 1, 0].reshape(-1, kv_heads, dim)
    assert not torch.equal(keys[slots], _rand((6, 2, 2, bs, kv_heads, dim), 3, dtype)[:, 1, 0].reshape(-1, kv_heads,
                                                                                                      dim)[slots])
    assert torch.equal(pool[:, 1, 1], want[:, 1, 1]) and torch.equal(pool[:, 0], want[:, 0])  # values exact, rest kept


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_an_out_of_range_slot_writes_nothing(dtype):
    from ultra_adaptive_kv_cache_engine.kernels.triton_fused_rope_kv import triton_rope_write_kv

    qkv, pool = _rand((2, 8 * 8), 5, dtype), _rand((3, 2, 2, 4, 2, 8), 6, dtype)
    ones = torch.ones((2, 8), dtype=dtype, device=DEVICE)
    before = pool.clone()
    triton_rope_write_kv(qkv, ones, ones * 0, 4, 2, pool[:, 0, 0], pool[:, 0, 1], torch.tensor([-1, 12], device=DEVICE))
    assert torch.equal(pool, before)


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_equals_the_formula(dtype):
    from ultra_adaptive_kv_cache_engine.kernels.triton_fused_silu_mul import triton_silu_mul

    x = _rand((3, 2 * 1500), 7, dtype, 3.0)
    gate, up = x.chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = triton_silu_mul(x)
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)
    assert _rel(got, want) < (1e-6 if dtype == torch.float32 else 2e-3)


@pytest.mark.gpu
@KERNELS
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("n", "k"), [(40, 96), (130, 1100)])
@pytest.mark.parametrize("prologue", ["none", "rms_norm", "silu_mul"])
def test_gemv_equals_its_twin(dtype, n, k, prologue):
    from ultra_adaptive_kv_cache_engine.kernels.triton_fused_gemv import Prologue, triton_gemv

    ops = get_decode_ops("torch", WRITE)
    w, h = _rand((n, k), 8, dtype, k**-0.5), _rand((1, n), 9, dtype)
    if prologue == "rms_norm":
        x, g = _rand((1, k), 10, dtype, 2.0), _rand((k,), 11, dtype)
        got, want = triton_gemv(x, w, Prologue.RMS_NORM, norm_weight=g, eps=1e-5), ops.norm_linear(x, g, 1e-5, w)
    elif prologue == "silu_mul":
        x = _rand((1, 2 * k), 12, dtype, 2.0)
        got, want = triton_gemv(x, w, Prologue.SILU_MUL, residual=h), ops.silu_mul_plus_linear(h, x, w)
    else:
        x = _rand((1, k), 13, dtype)
        got, want = triton_gemv(x, w, Prologue.NONE, residual=h), ops.plus_linear(h, x, w)
    assert got.shape == (1, n) and got.dtype == dtype
    assert _rel(got, want) < (1e-5 if dtype == torch.float32 else 8e-3)


@pytest.mark.gpu
@KERNELS
def test_gemv_rejects_a_mismatched_norm_weight():
    from ultra_adaptive_kv_cache_engine.kernels.triton_fused_gemv import Prologue, triton_gemv

    x, w = torch.zeros((1, 8)), torch.zeros((4, 8))
    with pytest.raises(ValueError, match="norm_weight"):
        triton_gemv(x, w, Prologue.NONE, norm_weight=torch.ones(8))
    with pytest.raises(ValueError, match=r"expected a contiguous \(1, 16\)"):
        triton_gemv(x, w, Prologue.SILU_MUL)



def _bf16_model(hidden: int = 256, layers: int = 2) -> PagedLlama:
    spec = TinyLlamaSpec(num_layers=layers, hidden_size=hidden, num_heads=8, num_kv_heads=2, intermediate_size=688,
                         initializer_range=0.05)
    return PagedLlama.from_hf(build_tiny_llama(spec, "cuda").model.to(torch.bfloat16))


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("name", ["triton", "triton_cublas"])
def test_fused_decode_is_the_torch_decode_in_bfloat16(batch, name):
    model = _bf16_model()
    assert model.decode_ops is not None and model.decode_ops.name == "triton"
    pool, inputs = _decode_world(model, batch, seed=batch)
    pool2 = pool.clone()
    got = model.with_decode_ops(name).decode(pool, inputs)
    want = model.with_decode_ops("torch").decode(pool2, inputs)
    assert _rel(got, want) < 3e-2  # bf16 roundings in a different order, through two layers
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.8
    written = (pool != pool2).any(dim=(1, 2, 4, 5)).nonzero().tolist()  # (block, offset) pairs that differ
    assert len(written) <= batch  # only the new tokens' slots can differ (by the rounding of their keys)


@pytest.mark.gpu
@GPU
def test_a_captured_fused_step_equals_its_eager_run():
    model = _bf16_model()
    pool, inputs = _decode_world(model, 1, seed=3)
    step = DecodeStep(model, pool, 1, 8)
    step.load(inputs.token_ids.tolist(), inputs.positions.tolist(), inputs.block_tables)
    eager_logits = model.decode(pool.clone(), inputs)
    assert step.capture(), step.capture_error
    logits, ids = step.run()
    torch.cuda.synchronize()
    assert torch.equal(logits, eager_logits) and int(ids[0]) == int(eager_logits.argmax())
