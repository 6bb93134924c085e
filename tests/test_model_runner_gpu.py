"""ModelRunner on CUDA (marked gpu, skipped without it): Triton kernels, CUDA-graph decode.

- float32: greedy tokens equal transformers' generate on the same GPU;
- bfloat16: decode replayed from CUDA graphs gives exactly the tokens of eager decode (same kernels), for a
  batch of different lengths, across calls (the graph is captured once per batch size and reused);
- a prefix evicted from the pool is promoted from a pinned CPU tier and the output is unchanged.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import random_ids

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.kernels import triton_available
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, TieredStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_runner import DecodeMode, ModelRunner, RunnerConfig  # noqa: E402 - the GPU benches' fixed-batch baseline

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton"),
]
NEW = 12
BS = 16


SPEC = TinyLlamaSpec(num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=2)


@functools.cache
def cuda_lm() -> LoadedModel:
    return build_tiny_llama(SPEC, "cuda")


def eos_of(lm: LoadedModel) -> int:
    return int(lm.model.generation_config.eos_token_id)


def cache_for(model: PagedLlama, num_blocks: int = 64, lower: LowerTiers | None = None) -> KVCacheManager:
    s = model.shape
    config = KVCacheConfig(block_size=BS, max_tokens=BS * num_blocks, device="cuda")
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, model.device)
    return KVCacheManager(config, spec, num_blocks=num_blocks, lower=lower)


def hf_new_tokens(lm: LoadedModel, prompt: list[int]) -> list[int]:
    """transformers' greedy continuation, cut after eos as the runner does."""
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=NEW, do_sample=False)
    new = out[0, len(prompt) :].tolist()
    return new[: new.index(eos_of(lm)) + 1] if eos_of(lm) in new else new


def test_float32_tokens_equal_transformers_on_the_gpu():
    lm = cuda_lm()
    model = PagedLlama.from_hf(lm.model)
    assert model.backend.name == "triton"
    runner = ModelRunner(model, cache_for(model), RunnerConfig(max_context=512))
    for n in (7, 40, 100):
        prompt = random_ids(n, seed=n)
        out = runner.generate([prompt], NEW, eos_of(lm))
        assert list(out.tokens[0]) == hf_new_tokens(lm, prompt)
        assert out.decode_mode in (DecodeMode.GRAPH, DecodeMode.NONE), out.graph_error


def test_graph_decode_equals_eager_decode_in_bfloat16():
    model = PagedLlama.from_hf(build_tiny_llama(SPEC, "cuda").model.to(torch.bfloat16))
    prompts = [random_ids(n, seed=100 + n) for n in (5, 33, 70)]
    eager = ModelRunner(model, cache_for(model), RunnerConfig(max_context=512, cuda_graphs=False))
    graph = ModelRunner(model, cache_for(model), RunnerConfig(max_context=512))
    expected = [eager.generate(prompts, NEW), eager.generate(prompts, NEW)]  # the second reuses prefixes
    got = [graph.generate(prompts, NEW), graph.generate(prompts, NEW)]  # the graph is captured once, replayed
    assert [r.decode_mode for r in expected] == [DecodeMode.EAGER] * 2
    assert [r.decode_mode for r in got] == [DecodeMode.GRAPH] * 2 and got[0].graph_error is None
    assert [r.tokens for r in got] == [r.tokens for r in expected]
    assert got[1].cached_tokens == (0, 32, 64) and len(graph._steps) == 1
    assert all(len(t) == NEW for r in got for t in r.tokens)


def test_a_prefix_is_promoted_from_a_pinned_cpu_tier_on_the_gpu():
    lm = cuda_lm()
    model = PagedLlama.from_hf(lm.model)
    digest = cache_for(model).namespace.digest
    tier = CPUTier(digest, capacity_bytes=1 << 26, pin_memory=True)
    lower = LowerTiers(TieredStore([tier]), make_codec("identity"))
    cache = cache_for(model, lower=lower)
    runner = ModelRunner(model, cache, RunnerConfig(max_context=512))
    prompt = random_ids(90, seed=7)
    first = runner.generate([prompt], NEW, eos_of(lm))
    cache.persist()
    with cache._lock:  # evict every cached block from the pool
        cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))
    out = runner.generate([prompt], NEW, eos_of(lm))
    assert out.cached_tokens == (80,) and cache.stats()["tier_hit_tokens"] == 80
    assert out.tokens == first.tokens
    lower.close()
