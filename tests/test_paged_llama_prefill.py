"""PagedLlama's two prefill paths over a cached prefix: the paged kernel and the gathered SDPA path.

On CPU in float32 (tiny random Llama, reference kernels): the gathered path gives the kernel path's logits
within 1e-5, and greedy tokens equal transformers' generate through the runner with the path forced; the
rule picks the path from the sizes. In bfloat16, one layer's attention by both paths agrees within 1e-2 (reference kernel on CPU; marked gpu:
the Triton kernel vs SDPA on CUDA, up to the Llama-3-8B head shape), and the tiny model's logits within 0.1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import baseline_generate, make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.kernels import PagedKV, get_backend, triton_available
from ultra_adaptive_kv_cache_engine.model.gathered_prefill import GatherRule, PrefillPath, gathered_attention
from ultra_adaptive_kv_cache_engine.model.paged_llama import LlamaShape, PagedLlama
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_runner import ModelRunner, RunnerConfig  # noqa: E402 - the GPU benches' fixed-batch baseline

BS = 4
NEW = 8


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model)


def prefill_twice(lm, model, prompt: list[int], cached: int, table: torch.Tensor) -> dict[PrefillPath, torch.Tensor]:
    """The tail's logits with each path, each over its own pool holding the head's KV (the first prefill)."""
    out = {}
    for path in PrefillPath:
        pool = make_paged(lm, block_size=BS).pool.kv
        model.prefill(pool, torch.tensor(prompt[:cached]), 0, table)
        out[path] = model.prefill(pool, torch.tensor(prompt[cached:]), cached, table, path)
    return out


@pytest.mark.parametrize(("length", "cached"), [(19, 11), (33, 32), (40, 8), (9, 1)])
def test_gathered_logits_equal_the_kernel_and_transformers(lm, model, length, cached):
    prompt = random_ids(length, seed=length + cached)
    table = torch.tensor([7, 3, 12, 0, 9, 21, 5, 30, 14, 2, 17], dtype=torch.int32)  # shuffled, longer than needed
    got = prefill_twice(lm, model, prompt, cached, table)
    torch.testing.assert_close(got[PrefillPath.GATHERED], got[PrefillPath.KERNEL], rtol=0, atol=1e-5)
    with torch.no_grad():
        expected = lm.model(torch.tensor([prompt])).logits[0, -1].float()
    torch.testing.assert_close(got[PrefillPath.GATHERED], expected, rtol=1e-4, atol=1e-5)


def test_the_gathered_path_writes_the_same_kv_into_the_pool(lm, model):
    prompt = random_ids(26, seed=4)
    table = torch.arange(7, dtype=torch.int32)
    pools = []
    for path in PrefillPath:
        pool = make_paged(lm, block_size=BS).pool.kv
        model.prefill(pool, torch.tensor(prompt[:17]), 0, table)
        model.prefill(pool, torch.tensor(prompt[17:]), 17, table, path)
        pools.append(pool)
    torch.testing.assert_close(pools[0], pools[1], rtol=0, atol=0)


def hf_tokens(lm, prompt: list[int]) -> list[int]:
    eos = int(lm.model.generation_config.eos_token_id)
    out = baseline_generate(lm, prompt, NEW)[0, len(prompt) :].tolist()
    return out[: out.index(eos) + 1] if eos in out else out


@pytest.mark.parametrize("chunk", [None, 5])
def test_runner_with_the_gathered_path_equals_generate(lm, model, chunk):
    config = RunnerConfig(max_context=128, prefill_chunk=chunk, prefill_path=PrefillPath.GATHERED)
    runner = ModelRunner(model, make_paged(lm, block_size=BS), config)
    eos = int(lm.model.generation_config.eos_token_id)
    shared = random_ids(28, seed=60)
    first, second = shared + random_ids(3, seed=61), shared + random_ids(6, seed=62)
    assert list(runner.generate([first], NEW, eos).tokens[0]) == hf_tokens(lm, first)
    out = runner.generate([second], NEW, eos)
    assert out.cached_tokens == (28,)
    assert list(out.tokens[0]) == hf_tokens(lm, second)


def test_the_rule_chooses_from_the_sizes_and_checks_its_values(lm):
    rule = GatherRule(max_new_tokens=64, min_prefix_tokens=1024)
    assert rule.choose(64, 1024) is PrefillPath.GATHERED
    assert rule.choose(65, 16384) is PrefillPath.KERNEL and rule.choose(1, 1023) is PrefillPath.KERNEL
    assert GatherRule().choose(64, 16320) is PrefillPath.GATHERED  # the default takes the long-prefix hit
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            GatherRule(max_new_tokens=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefill_path='gathered'"):
        RunnerConfig(prefill_path="gathered")  # type: ignore[arg-type]
    model = PagedLlama.from_hf(lm.model)
    assert model.gather_rule == GatherRule()
    with pytest.raises(TypeError, match="PrefillPath"):
        model.prefill(make_paged(lm).pool.kv, torch.tensor([5, 6]), 4, torch.arange(2), "gathered")  # type: ignore[arg-type]


def test_a_rule_that_always_gathers_gives_the_forced_paths_logits(lm):
    always = PagedLlama(*_parts(lm), gather_rule=GatherRule(max_new_tokens=10**6, min_prefix_tokens=0))
    never = PagedLlama(*_parts(lm), gather_rule=GatherRule(max_new_tokens=0))
    prompt = random_ids(21, seed=70)
    table = torch.arange(6, dtype=torch.int32)
    logits = []
    for m, path in ((always, None), (never, None), (never, PrefillPath.GATHERED)):
        pool = make_paged(lm, block_size=BS).pool.kv
        m.prefill(pool, torch.tensor(prompt[:13]), 0, table)
        logits.append(m.prefill(pool, torch.tensor(prompt[13:]), 13, table, path))
    torch.testing.assert_close(logits[0], logits[2], rtol=0, atol=0)  # the same computation
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-5)


def _parts(lm) -> tuple:
    rotary = lm.model.model.rotary_emb
    return (LlamaShape.from_config(lm.model.config), dict(lm.model.state_dict()), rotary.inv_freq,
            float(rotary.attention_scaling), 256)


def kernel_and_gathered(backend, pool, table, start: int, q: torch.Tensor, layer: int) -> tuple:
    """One layer's prefill attention of q (T, heads, dim) at positions start.. by the backend's paged kernel and
    by the gathered path."""
    t, dim = int(q.shape[0]), int(q.shape[-1])
    lens = torch.tensor([start + t], dtype=torch.int32, device=q.device)
    kv = PagedKV.from_pool(pool, layer, table[None], lens, max_seq_len=start + t)
    starts = torch.tensor([0, t], dtype=torch.int32, device=q.device)
    kernel = backend.prefill_attention(q, starts, kv, max_query_len=t, scale=dim**-0.5)
    return kernel, gathered_attention(pool, table, start, t, dim**-0.5)(layer, q, q, q)


def test_one_layers_attention_equals_the_reference_kernel_in_bfloat16():
    g = torch.Generator().manual_seed(0)
    pool = torch.randn((64, 2, 2, 16, 2, 16), generator=g).to(torch.bfloat16)
    table = torch.randperm(64, generator=g)[:30].to(torch.int32)
    q = torch.randn((48, 8, 16), generator=g).to(torch.bfloat16)
    kernel, gathered = kernel_and_gathered(get_backend("reference"), pool, table, 432, q, 1)
    torch.testing.assert_close(gathered, kernel, rtol=1e-2, atol=1e-2)


NEEDS_GPU = pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton")


@pytest.mark.gpu
@NEEDS_GPU
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "block", "start", "new"),
                         [(8, 2, 16, 16, 432, 48), (32, 8, 128, 64, 4032, 64), (32, 8, 128, 64, 1000, 1)])
def test_both_paths_agree_in_bfloat16_on_the_gpu(heads, kv_heads, dim, block, start, new):
    g = torch.Generator().manual_seed(heads + start)
    blocks = -(-(start + new) // block)
    pool = torch.randn((blocks + 8, 2, 2, block, kv_heads, dim), generator=g).to("cuda", torch.bfloat16)
    table = torch.randperm(blocks + 8, generator=g)[: blocks + 2].to("cuda", torch.int32)
    q = torch.randn((new, heads, dim), generator=g).to("cuda", torch.bfloat16)
    kernel, gathered = kernel_and_gathered(get_backend("triton"), pool, table, start, q, 1)
    torch.testing.assert_close(gathered, kernel, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@NEEDS_GPU
def test_the_model_paths_agree_in_bfloat16_on_the_gpu():
    spec = TinyLlamaSpec(num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=2)
    lm = build_tiny_llama(spec, "cuda")
    model = PagedLlama.from_hf(lm.model.to(torch.bfloat16))
    assert model.backend.name == "triton"
    prompt = random_ids(480, seed=80)  # the tiny model's positions stop at 512
    bs, cached = 16, 432
    table = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:30].to(torch.int32)
    out = {}
    for path in PrefillPath:
        pool = torch.zeros((64, 2, 2, bs, 2, 16), dtype=torch.bfloat16, device="cuda")
        model.prefill(pool, torch.tensor(prompt[:cached]), 0, table)
        out[path] = model.prefill(pool, torch.tensor(prompt[cached:]), cached, table, path)
    # logits are rounded to bfloat16 after two layers of differently ordered sums: 0.035 apart on CPU
    torch.testing.assert_close(out[PrefillPath.GATHERED], out[PrefillPath.KERNEL], rtol=0, atol=0.1)


def test_the_repeated_heads_fallback_equals_native_gqa(lm, model, monkeypatch):
    """Older torch releases' causal bias does not forward enable_gqa: K/V heads are repeated instead."""
    from ultra_adaptive_kv_cache_engine.model import gathered_prefill

    prompt = random_ids(23, seed=90)
    table = torch.arange(6, dtype=torch.int32)
    native = prefill_twice(lm, model, prompt, 15, table)[PrefillPath.GATHERED]
    monkeypatch.setattr(gathered_prefill, "_BIAS_TAKES_GQA", False)
    repeated = prefill_twice(lm, model, prompt, 15, table)[PrefillPath.GATHERED]
    torch.testing.assert_close(repeated, native, rtol=0, atol=1e-6)
