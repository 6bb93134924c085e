"""Quantized pools on the live path (tiny random Llama, CPU, float32, reference kernels): the scheduler and the
paged backend over staging blocks, quantize on write at the end of each step, prefix reuse of sealed blocks,
write-back of sealed generated blocks, and the engine with `kv_dtype`."""

from __future__ import annotations

import asyncio

import pytest
import torch
from model_fixtures import random_ids, tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState, SequenceStatus
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

BS = 4
PROMPTS = [random_ids(n, seed=n) for n in (5, 13, 22, 9)]


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model, max_positions=256)


def quant_cache(lm, fmt: str | None, num_blocks: int = 64, residual: int = 0) -> KVCacheManager:
    config = KVCacheConfig(block_size=BS, kv_dtype=fmt, kv_residual_tokens=residual, cpu_tier_bytes=0, device="cpu")
    spec = lm.kv_spec(BS)
    spec = type(spec)(**{**spec.__dict__, "pool_format": fmt})
    from ultra_adaptive_kv_cache_engine.cache.tier_list import namespace_codec

    return KVCacheManager(config, spec, num_blocks=num_blocks, namespace=lm.namespace(spec, namespace_codec(config)))


class World:
    """A paged backend over a fresh (quantized) pool, its scheduler and a step loop driven by the test."""

    def __init__(self, lm, model, fmt: str | None, num_blocks: int = 64, residual: int = 0, **config) -> None:
        self.lm = lm
        self.cache = quant_cache(lm, fmt, num_blocks, residual)
        self.backend = PagedLlamaBackend(model, self.cache, SchedulerConfig(**config))
        self.scheduler = Scheduler(self.backend, SchedulerConfig(admission_headroom=0.0, **config))
        self.loop = StepLoop(self.scheduler, threaded=False)

    def run(self, prompts: list[list[int]], new: int = 8, keep: bool = True) -> list[SequenceState]:
        states = []
        for prompt in prompts:
            state = SequenceState(prompt=list(prompt), params=SamplingParams(max_new_tokens=new),
                                  text=IncrementalText(self.lm.tokenizer.decode, ()), eos_token_id=None)
            states.append(state)
            self.loop.submit(state, lambda item: True)
        self.loop.run_until_idle()
        return states

    def balanced(self) -> bool:
        staging = self.backend.staging
        free_staging = staging is None or staging.num_free == staging.capacity
        return (self.cache.stats()["sequences"] == 0 and self.cache.num_free_blocks == self.cache.num_blocks
                and free_staging)


def test_int8_greedy_tokens_equal_the_unquantized_ones(lm, model):
    plain = World(lm, model, None).run(PROMPTS, new=12)
    world = World(lm, model, "int8")
    quant = world.run(PROMPTS, new=12)
    assert [s.generated for s in quant] == [s.generated for s in plain]
    assert all(s.status is SequenceStatus.FINISHED for s in quant) and world.balanced()


@pytest.mark.parametrize("fmt", list(POOL_FORMATS))
def test_every_format_runs_reuses_its_prefix_and_balances(lm, model, fmt):
    world = World(lm, model, fmt)
    prompt = random_ids(23, seed=7)
    first = world.run([prompt])[0]
    # 23 + 8 tokens, the last without KV: 7 full blocks sealed and named (the generated ones written back)
    assert world.cache.stats()["indexed_blocks"] == 7 and world.balanced()
    again = world.run([prompt])[0]
    assert first.cached_tokens == 0 and again.cached_tokens == 20  # 5 sealed blocks of 4 (all but the last token)
    assert len(again.generated) == 8 and world.balanced()


def test_committed_blocks_hold_the_quantized_kv_of_the_prompt(lm, model):
    """Quantize on write: a committed block's slabs are exactly the pool format's quantisation of the KV the
    unquantized pool holds for the same tokens (a first prefill computes the same KV either way)."""
    prompt = random_ids(11, seed=3)
    plain, quant = World(lm, model, None), World(lm, model, "int4")
    plain.run([prompt], new=1)
    quant.run([prompt], new=1)
    fmt = POOL_FORMATS["int4"]
    for i in range(2):  # tokens 0..7: two full blocks
        block = plain.cache.lookup(prompt).block_ids[i]
        sealed = quant.cache.lookup(prompt).block_ids[i]
        fp = plain.cache.kv[block]  # (layers, 2, bs, heads, dim)
        for layer in range(fp.shape[0]):
            assert torch.equal(quant.cache.kv[sealed, layer, 0], fmt.quantize(fp[layer, 0][None], True)[0])
            assert torch.equal(quant.cache.kv[sealed, layer, 1], fmt.quantize(fp[layer, 1][None], False)[0])
    assert len(quant.cache.lookup(prompt).block_ids) == 2  # the partial third block was never committed


def test_eight_concurrent_streams_with_a_quantized_pool_complete_and_balance(lm, model):
    world = World(lm, model, "fp8", num_blocks=48, max_running=8, max_step_tokens=24)
    prompts = [random_ids(6 + 3 * i, seed=40 + i) for i in range(8)]
    states = world.run(prompts, new=10)
    assert all(s.status is SequenceStatus.FINISHED and len(s.generated) == 10 for s in states)
    assert world.balanced()


def test_preemption_under_a_tiny_quantized_pool_finishes_and_balances(lm, model):
    world = World(lm, model, "int8", num_blocks=12)
    states = world.run(PROMPTS, new=8)
    assert all(s.status is SequenceStatus.FINISHED and len(s.generated) == 8 for s in states)
    assert sum(s.preemptions for s in states) > 0 and world.balanced()


def test_the_staging_tensor_grows_when_a_step_needs_more(lm, model):
    world = World(lm, model, "int4", max_running=1, max_step_tokens=4)  # room for 1 + 2 + 2 staging blocks
    assert world.backend.staging.capacity == 5
    states = world.run([random_ids(30, seed=9)], new=2)  # the prompt prefills in chunks of 4
    assert len(states[0].generated) == 2 and world.balanced()
    staging = World(lm, model, "int4", max_running=1, max_step_tokens=4).backend.staging
    for seq_id in range(4):
        staging.open(seq_id, 0)
        staging.stage(seq_id, 8)  # two blocks each: 8 > 5
    assert staging.capacity == 10 and staging.generation == 1 and staging.num_free == 2


def _engine(lm, fmt: str | None) -> UltraAdaptiveKVCacheEngine:
    return UltraAdaptiveKVCacheEngine(KVCacheConfig(block_size=BS, kv_dtype=fmt, cpu_tier_bytes=0, device="cpu"),
                                      model=lm)


def test_the_engine_serves_a_quantized_pool_and_describes_it(lm):
    request = {"text": "A system prompt long enough to fill a few blocks.", "max_new_tokens": 6, "raw": True}
    engine = _engine(lm, "int2")
    try:
        first = asyncio.run(engine.process_request(request))
        again = asyncio.run(engine.process_request(request))
        assert first["cache_hit"] is False and again["cached_tokens"] > 0
        described = engine.describe()["kv"]
        assert described["pool_format"] == "int2" and described["namespace"] == engine.cache_manager().namespace.digest.hex()
        stats = engine.get_stats()["model"]
        assert stats["sequences"] == 0 and stats["free_blocks"] == stats["num_blocks"]
        with pytest.raises(ValueError, match="quantized"):
            engine.hf_cache()
    finally:
        engine.close()


def test_the_hf_backend_refuses_a_quantized_pool_by_name(lm):
    from ultra_adaptive_kv_cache_engine.engine.backend_registry import make_backend

    cache = quant_cache(lm, "int4")
    with pytest.raises(ValueError, match="'hf_generate' cannot serve .*the KV pool is quantized \\(kv_dtype='int4'\\)"):
        make_backend("hf_generate", lm, cache, SchedulerConfig())
    assert isinstance(make_backend(None, lm, cache, SchedulerConfig()), PagedLlamaBackend)


@pytest.mark.parametrize("fmt", ["int8", "int2"])
def test_shadow_verification_reads_sealed_blocks_dequantised(lm, fmt):
    from ultra_adaptive_kv_cache_engine.engine.session import ModelSession

    config = KVCacheConfig(block_size=BS, kv_dtype=fmt, max_new_tokens=3, max_memory=1 << 20, shadow_fraction=1.0,
                           cpu_tier_bytes=0, device="cpu")
    session = ModelSession(config, loaded=lm)
    prompt = "The quick brown fox jumps over the lazy dog. " * 2
    try:
        for text in (prompt, prompt + "Again."):
            asyncio.run(session.process({"text": text, "raw": True, "temperature": 0}))
        session.shadow.drain()
        clean = session.stats()["shadow"]
        assert (clean["checks"], clean["mismatches"]) == (1, 0) and clean["checked_blocks"] > 2
        match = session.cache.lookup(session.encode_request({"text": prompt, "raw": True}))
        spec = session.cache.spec
        forged = torch.full((spec.num_layers, spec.block_size, spec.num_kv_heads, spec.head_dim), 50.0)
        fmt = POOL_FORMATS[fmt]  # a block that dequantises to 50 everywhere, far from the model's KV
        session.cache.kv[match.block_ids[1]] = torch.stack([fmt.quantize(forged, True), fmt.quantize(forged, False)], 1)
        asyncio.run(session.process({"text": prompt + "Once more.", "raw": True, "temperature": 0}))
        session.shadow.drain()
        assert session.stats()["shadow"]["mismatches"] == 1 and session.cache.lookup(
            session.encode_request({"text": prompt, "raw": True})).num_tokens == BS
    finally:
        session.close()
