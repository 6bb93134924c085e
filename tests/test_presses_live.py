"""Presses on the live path (tiny random Llama, CPU, float32, reference kernels): the scheduler and the paged
backend press a prompt (all but its last token) at the end of its prefill, continue on the pressed blocks,
name them by the press, and a later request with the same press reuses them whole; the KV a request sees
equals transformers' with the evicted tokens masked (sinks_window) and the bench harness's pressed
continuation (snapkv); int8 pools; bad press lines."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import random_ids, tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.cache.tier_list import namespace_codec
from ultra_adaptive_kv_cache_engine.compression.presses import PressConfig, parse_press
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kv_quality_parts import KVRunner, greedy  # noqa: E402

BS = 4
PROMPT = random_ids(23, seed=21)  # pressed: its first 22 tokens (5 full blocks and a tail of 2)
SINKS = PressConfig("sinks_window", tokens=8)  # keeps 0..3 and 18..21 of the 22
SNAP = PressConfig("snapkv", tokens=10, params={"window": 3, "kernel": 3})  # rounded up to 12 tokens


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model, max_positions=256)


class World:
    """A paged backend over a fresh (quantized) pool, its scheduler and a step loop driven by the test."""

    def __init__(self, lm, model, fmt: str | None = None, num_blocks: int = 64, **config) -> None:
        self.lm = lm
        cache_config = KVCacheConfig(block_size=BS, kv_dtype=fmt, cpu_tier_bytes=0, device="cpu")
        spec = lm.kv_spec(BS)
        spec = type(spec)(**{**spec.__dict__, "pool_format": fmt})
        self.cache = KVCacheManager(cache_config, spec, num_blocks=num_blocks,
                                    namespace=lm.namespace(spec, namespace_codec(cache_config)))
        self.backend = PagedLlamaBackend(model, self.cache, SchedulerConfig(**config))
        self.scheduler = Scheduler(self.backend, SchedulerConfig(admission_headroom=0.0, **config))
        self.loop = StepLoop(self.scheduler, threaded=False)

    def run(self, prompts: list[list[int]], press: PressConfig | None, new: int = 6) -> list[SequenceState]:
        states = []
        for prompt in prompts:
            state = SequenceState(prompt=list(prompt), params=SamplingParams(max_new_tokens=new),
                                  text=IncrementalText(self.lm.tokenizer.decode, ()), eos_token_id=None, press=press)
            states.append(state)
            self.loop.submit(state, lambda item: True)
        self.loop.run_until_idle()
        return states

    def idle(self) -> tuple[int, int, int]:
        """(sequences, free blocks, staging blocks in use) at idle."""
        staging = self.backend.staging
        in_staging = 0 if staging is None else staging.capacity - staging.num_free
        return self.cache.stats()["sequences"], self.cache.num_free_blocks, in_staging


def masked_greedy(lm, prefix: list[int], first: int, kept: list[int], new: int) -> list[int]:
    """transformers' greedy tokens after `prefix` + [first], every token after `prefix` seeing only the `kept`
    tokens of `prefix` (and the later tokens), at their true positions."""
    cont = [first]
    for _ in range(new):
        total = len(prefix) + len(cont)
        mask = torch.tril(torch.ones(total, total, dtype=torch.bool))
        mask[len(prefix) :, [t for t in range(len(prefix)) if t not in set(kept)]] = False
        with torch.no_grad():
            logits = lm.model(torch.tensor([prefix + cont]), attention_mask=mask[None, None]).logits[0, -1]
        cont.append(int(logits.argmax()))
    return cont[1:]


def test_sinks_window_on_the_live_path_continues_as_transformers_with_the_evicted_tokens_masked(lm, model):
    world = World(lm, model, max_step_tokens=16)  # the prompt prefilled in two chunks, then pressed
    [state] = world.run([PROMPT], SINKS)
    kept = [0, 1, 2, 3, 18, 19, 20, 21]
    assert state.generated == masked_greedy(lm, PROMPT[:-1], PROMPT[-1], kept, 6)
    assert state.cached_tokens == 0 and state.finish_reason == "length"
    # idle: every block free or cached: 5 full blocks of the unpressed 22 tokens, 2 pressed blocks
    assert world.idle() == (0, 64, 0)
    assert world.cache.stats()["indexed_blocks"] == 7 and world.cache.counters.get("named_committed_blocks") == 2


def test_snapkv_on_the_live_path_continues_as_the_bench_harness_does(lm, model):
    [state] = World(lm, model).run([PROMPT], SNAP, new=8)
    harness = World(lm, model)
    runner = KVRunner("snapkv", model, harness.cache)
    seq = runner.open()
    runner.forward(seq, PROMPT[:-1])
    pressed = runner.press(seq, PROMPT[:-1], SNAP, model.inv_freq)
    assert pressed.length == 12
    logits = runner.forward(pressed, PROMPT[-1:], all_logits=False)[-1]
    assert state.generated == greedy(runner, pressed, logits, 8)


def test_the_same_press_reuses_the_pressed_blocks_another_press_or_none_does_not(lm, model):
    world = World(lm, model)
    [first] = world.run([PROMPT], SINKS)
    [again] = world.run([PROMPT], SINKS)
    assert (first.cached_tokens, again.cached_tokens) == (0, 22)  # the pressed chain stands for 22 tokens
    assert again.generated == first.generated and world.cache.counters.get("named_hit_tokens") == 22
    [plain] = world.run([PROMPT], None)  # the unpressed blocks of the first request: 5 full ones
    [other] = world.run([PROMPT], SNAP)
    assert (plain.cached_tokens, other.cached_tokens) == (20, 20)
    assert world.cache.counters.get("named_hit_tokens") == 22
    [longer] = world.run([PROMPT + random_ids(6, seed=22)], SINKS)  # starts with the pressed 22 tokens
    assert longer.cached_tokens == 22 and world.cache.counters.get("named_hit_tokens") == 44
    assert world.idle() == (0, 64, 0)
    # 5 unpressed blocks, the no-press request's written-back generated tokens (23 + 5 = 28: 2 more), 2 sinks
    # blocks, 3 snapkv blocks
    assert world.cache.stats()["indexed_blocks"] == 5 + 2 + 2 + 3


def test_a_prompt_the_budget_keeps_whole_is_not_pressed(lm, model):
    short = PROMPT[:9]  # 8 tokens to press, the budget keeps 8
    world = World(lm, model)
    [pressed] = world.run([short], SINKS)
    [plain] = World(lm, model).run([short], None)
    assert pressed.generated == plain.generated
    assert world.cache.counters.get("named_committed_blocks") == 0
    assert world.backend.press_step(SINKS).kept_tokens(8) == 8


def test_preempted_pressed_sequences_resume_on_their_pressed_chain(lm, model):
    prompts = [PROMPT, random_ids(23, seed=23)]
    expected = [s.generated for s in World(lm, model).run(prompts, SINKS, new=40)]
    world = World(lm, model, num_blocks=20)  # 2 x (2 pressed + 11 generated) blocks do not fit
    states = world.run(prompts, SINKS, new=40)
    assert world.scheduler.num_preemptions > 0
    assert [s.generated for s in states] == expected
    assert world.idle() == (0, 20, 0)


def test_an_int8_pool_presses_and_reuses_and_balances(lm, model):
    prompts = [PROMPT, random_ids(30, seed=24)]
    world = World(lm, model, "int8")
    first = world.run(prompts, SINKS)
    assert [s.cached_tokens for s in first] == [0, 0] and world.cache.counters.get("named_committed_blocks") == 4
    again = world.run(prompts, SINKS)  # the same sealed pressed KV: the same tokens
    assert [s.cached_tokens for s in again] == [22, 29]
    assert [s.generated for s in again] == [s.generated for s in first]
    assert world.idle() == (0, 64, 0)
    # pressed: 22 -> 8 and 29 -> 8 tokens; unpressed full blocks: 5 and 7
    assert world.cache.stats()["indexed_blocks"] == 5 + 7 + 2 + 2


@pytest.mark.parametrize("line, fragment", [
    ("snapkv", "no budget"), ("bogus:0.5", "unknown press 'bogus'"), ("snapkv:0.5,tokens=8", "one budget"),
    ("snapkv:1.5", "ratio=1.5"), ("snapkv:0.5,width=3", "no parameter 'width'"), ("snapkv:0", "tokens=0"),
    ("snapkv:0.5,window", "not PARAM=VALUE"),
])
def test_bad_press_lines_name_the_line_and_the_presses(line, fragment):
    with pytest.raises(ValueError) as info:
        parse_press(line)
    assert fragment in str(info.value) and f"kv_press={line!r}" in str(info.value)
    assert "keys_norm, sinks_window, snapkv" in str(info.value)


def test_press_lines_parse():
    assert parse_press(None) is None and parse_press(" None ") is None
    assert parse_press("snapkv:0.5") == PressConfig("snapkv", ratio=0.5)
    assert parse_press("sinks_window:512") == parse_press("sinks_window:tokens=512") == PressConfig("sinks_window", tokens=512)
    config = parse_press("snapkv:ratio=0.25,window=16,pooling=avg")
    assert config == PressConfig("snapkv", ratio=0.25, params={"window": 16, "pooling": "avg"})
    from ultra_adaptive_kv_cache_engine.compression.presses import format_press

    assert format_press(config) == "snapkv:ratio=0.25,pooling=avg,window=16" and parse_press(format_press(config)) == config
    assert KVCacheConfig(kv_press="none").kv_press is None
    with pytest.raises(ValueError, match="kv_press=5 must be a string"):
        KVCacheConfig(kv_press=5)


def engine(lm, **fields) -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(block_size=BS, max_new_tokens=6, max_memory=2 * 1024**2, cpu_tier_bytes=0, **fields)
    return UltraAdaptiveKVCacheEngine(config, model=lm)


def process(eng: UltraAdaptiveKVCacheEngine, **request) -> dict:
    return asyncio.run(eng.process_request({"action": "process", "text": "press me, please: " * 3, **request}))


def test_the_engine_presses_by_config_and_by_request(lm):
    eng = engine(lm, kv_press="sinks_window:tokens=8")
    try:
        first = process(eng)
        n = first["prompt_tokens"]
        again = process(eng)
        assert (first["cached_tokens"], again["cached_tokens"], again["text"]) == (0, n - 1, first["text"])
        plain = process(eng, kv_press="none")  # the unpressed blocks of the first request
        assert plain["cached_tokens"] == (n - 1) // BS * BS
        other = process(eng, kv_press="sinks_window:tokens=12")
        assert other["cached_tokens"] == min(n - 2, (n - 1) // BS * BS)
        with pytest.raises(ValueError, match="unknown press 'nope'"):
            process(eng, kv_press="nope:0.5")
    finally:
        eng.close()


def test_a_bad_config_press_or_a_backend_that_cannot_press_fails_when_the_session_starts(lm):
    with pytest.raises(ValueError, match="unknown press 'bogus'"):
        process(engine(lm, kv_press="bogus:0.5"))
    eng = engine(lm, kv_press="snapkv:0.5", model_backend="hf_generate")
    with pytest.raises(ValueError, match="kv_press='snapkv:0.5' needs the paged_llama backend; 'hf_generate'"):
        process(eng)
    eng = engine(lm, model_backend="hf_generate")
    try:
        with pytest.raises(ValueError, match="needs the paged_llama backend"):
            process(eng, kv_press="snapkv:0.5")
    finally:
        eng.close()


def test_a_pressed_chain_is_persisted_and_a_new_engine_reuses_it(lm, tmp_path):
    fields = {"kv_press": "sinks_window:tokens=8", "enable_persistence": True, "persistence_path": str(tmp_path)}
    first_engine = engine(lm, **fields)
    try:
        first = process(first_engine)
        written = first_engine.persist()
    finally:
        first_engine.close()
    n = first["prompt_tokens"]
    # on disk: the unpressed prompt's full blocks (n - 1 tokens), the 2 pressed blocks; no generated blocks
    assert written["kv_blocks"] == (n - 1) // BS + 2
    fresh = engine(lm, **fields)
    try:
        fresh.load()
        again = process(fresh)
        assert (again["cached_tokens"], again["text"]) == (n - 1, first["text"])
        counters = fresh.cache_manager().counters.snapshot()
        assert (counters["named_tier_hit_blocks"], counters["named_hit_tokens"]) == (2, n - 1)
    finally:
        fresh.close()
