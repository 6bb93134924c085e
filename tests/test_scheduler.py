"""The continuous-batching scheduler on the tiny random Llama (CPU, float32, reference kernels), driven step by
step on the test's thread: greedy tokens of concurrent requests equal transformers' generate of each alone;
requests join mid-decode, prompts prefill in chunks, cached prefixes are not recomputed, preemption under a
tiny pool stays exact, cancellation and the end of every request leave the pool exactly balanced."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import baseline_generate, make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.requests import RequestError
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import QueueFullError, Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState, SequenceStatus
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

BS = 4
NEW = 8


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster on a shared 2-core machine
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model, max_positions=256)


class World:
    """A paged backend over a fresh pool, its scheduler and a step loop driven by the test."""

    def __init__(self, lm, model, num_blocks: int = 64, **config) -> None:
        self.lm = lm
        self.cache = make_paged(lm, block_size=BS, num_blocks=num_blocks)
        self.backend = PagedLlamaBackend(model, self.cache)
        self.scheduler = Scheduler(self.backend, SchedulerConfig(admission_headroom=0.0, **config))
        self.loop = StepLoop(self.scheduler, threaded=False)
        self.chunks: dict[int, list] = {}
        self.steps: list[list[tuple[int, int, int]]] = []  # per step: (request, start, count)
        execute = self.backend.execute

        def recording(chunks):
            self.steps.append([(self.number(c.state), c.start, c.count) for c in chunks])
            return execute(chunks)

        self.backend.execute = recording
        self.states: list[SequenceState] = []

    def number(self, state: SequenceState) -> int:
        return next(i for i, s in enumerate(self.states) if s is state)

    def submit(self, prompt: list[int], new: int = NEW, priority: int = 0, **params) -> SequenceState:
        state = SequenceState(prompt=list(prompt), params=SamplingParams(max_new_tokens=new, **params),
                              text=IncrementalText(self.lm.tokenizer.decode, params.get("stop", ())),
                              eos_token_id=eos_of(self.lm), priority=priority)
        self.states.append(state)
        chunks = self.chunks.setdefault(len(self.states) - 1, [])
        self.loop.submit(state, lambda item: chunks.append(item) or True)
        return state

    def balanced(self) -> bool:
        return self.cache.stats()["sequences"] == 0 and self.cache.num_free_blocks == self.cache.num_blocks


def eos_of(lm) -> int:
    return int(lm.model.generation_config.eos_token_id)


def hf_tokens(lm, prompt: list[int], new: int = NEW) -> list[int]:
    """transformers' greedy continuation, cut after eos."""
    out = baseline_generate(lm, prompt, new)[0, len(prompt) :].tolist()
    return out[: out.index(eos_of(lm)) + 1] if eos_of(lm) in out else out


PROMPTS = [random_ids(n, seed=n) for n in (5, 13, 22, 9)]


def test_concurrent_requests_equal_generate_alone_and_share_decode_steps(lm, model):
    world = World(lm, model)
    states = [world.submit(p) for p in PROMPTS]
    world.loop.run_until_idle()
    assert [s.generated for s in states] == [hf_tokens(lm, p) for p in PROMPTS]
    assert all(s.status is SequenceStatus.FINISHED and s.finish_reason in ("stop", "length") for s in states)
    assert world.steps[0] == [(i, 0, len(p)) for i, p in enumerate(PROMPTS)]  # all four prefilled in step 1
    assert world.steps[1] == [(i, len(p), 1) for i, p in enumerate(PROMPTS)]  # then one batched decode
    assert world.balanced()


def test_requests_join_mid_decode(lm, model):
    world = World(lm, model)
    first = world.submit(PROMPTS[2], new=12)
    for _ in range(4):
        world.loop.step()
    late = [world.submit(p) for p in PROMPTS[:2]]
    world.loop.step()
    assert world.steps[-1] == [(0, 22 + 3, 1), (1, 0, 5), (2, 0, 13)]  # decode and two prefills, one step
    world.loop.run_until_idle()
    assert first.generated == hf_tokens(lm, PROMPTS[2], 12)
    assert [s.generated for s in late] == [hf_tokens(lm, p) for p in PROMPTS[:2]]
    assert world.balanced()


def test_chunked_prefill_under_the_step_budget_is_exact(lm, model):
    world = World(lm, model, max_step_tokens=6)
    running = world.submit(PROMPTS[0], new=10)
    world.loop.step()  # 5 prompt tokens, then it decodes one token per step
    long = world.submit(random_ids(23, seed=7))
    world.loop.run_until_idle()
    assert running.generated == hf_tokens(lm, PROMPTS[0], 10)
    assert long.generated == hf_tokens(lm, random_ids(23, seed=7))
    prefill = [(start, count) for step in world.steps for (r, start, count) in step if r == 1 and count > 1]
    assert prefill == [(0, 5), (5, 5), (10, 5), (15, 5), (20, 3)]  # 1 budget token per step goes to the decode
    assert all(sum(c for _, _, c in step) <= 6 for step in world.steps)
    assert world.balanced()


def test_cached_prefix_is_reused_at_admission_and_not_recomputed(lm, model):
    world = World(lm, model)
    base = random_ids(18, seed=11)
    first = world.submit(base)
    world.loop.run_until_idle()
    # turn two: the first turn's prompt and answer, then more; its generated KV was written back
    turn2 = base + first.generated + random_ids(6, seed=12)
    second = world.submit(turn2)
    world.loop.run_until_idle()
    assert first.cached_tokens == 0
    with_kv = len(base) + len(first.generated) - 1  # the last generated token has no KV
    assert second.cached_tokens == with_kv // BS * BS
    assert world.steps[-len(second.generated)] == [(1, second.cached_tokens, len(turn2) - second.cached_tokens)]
    assert second.generated == hf_tokens(lm, turn2)
    assert world.balanced()


def test_preemption_under_a_tiny_pool_gives_the_exact_tokens(lm, model):
    # 14 blocks of 4 tokens; each request ends holding ceil((10 + 11) / 4) = 6 blocks: three cannot run at once
    world = World(lm, model, num_blocks=14)
    prompts = [random_ids(10, seed=20 + i) for i in range(3)]
    states = [world.submit(p, new=12) for p in prompts]
    world.loop.run_until_idle()
    assert world.scheduler.num_preemptions > 0 and sum(s.preemptions for s in states) > 0
    assert [s.generated for s in states] == [hf_tokens(lm, p, 12) for p in prompts]
    assert world.balanced()


def test_cancellation_frees_blocks_at_the_next_step(lm, model):
    world = World(lm, model, max_running=2)
    states = [world.submit(p, new=20) for p in PROMPTS[:3]]
    for _ in range(3):
        world.loop.step()
    assert states[2].status is SequenceStatus.WAITING
    before = world.cache.num_free_blocks
    world.loop.cancel(states[0])
    world.loop.cancel(states[2])  # waiting: ends without having held a block
    world.loop.step()
    assert states[0].finish_reason == "cancelled" and states[2].finish_reason == "cancelled"
    assert world.chunks[0][-1].finish_reason == "cancelled" and world.chunks[2][-1].finish_reason == "cancelled"
    assert world.cache.stats()["sequences"] == 1 and world.cache.num_free_blocks > before
    world.loop.run_until_idle()
    assert states[1].generated == hf_tokens(lm, PROMPTS[1], 20)
    assert world.balanced()


def test_priority_orders_admission_and_preempts_lower_priority(lm, model):
    world = World(lm, model, max_running=1)
    low = world.submit(PROMPTS[0], priority=5)
    mid = world.submit(PROMPTS[1], priority=1)
    high = world.submit(PROMPTS[2], priority=0)
    world.loop.run_until_idle()
    assert high.finished_s < mid.finished_s < low.finished_s
    assert low.preemptions == mid.preemptions == high.preemptions == 0
    # a more urgent request arriving while the batch is full preempts the running one
    background = world.submit(PROMPTS[3], new=12, priority=3)
    world.loop.step()
    world.loop.step()
    urgent = world.submit(PROMPTS[0], priority=0)
    world.loop.run_until_idle()
    assert background.preemptions == 1 and urgent.finished_s < background.finished_s
    assert background.generated == hf_tokens(lm, PROMPTS[3], 12) and urgent.generated == hf_tokens(lm, PROMPTS[0])
    assert world.balanced()


def test_full_queue_and_oversized_requests_are_refused(lm, model):
    world = World(lm, model, num_blocks=8, max_waiting=2)
    world.submit(PROMPTS[0])
    world.submit(PROMPTS[0])
    with pytest.raises(QueueFullError, match="max_waiting=2"):
        world.submit(PROMPTS[1])
    with pytest.raises(RequestError, match="needs 9 KV blocks; the pool has 8"):
        world.scheduler.add(SequenceState(prompt=[5] * 30, params=SamplingParams(max_new_tokens=6),
                                          text=IncrementalText(lm.tokenizer.decode)))
    world.loop.run_until_idle()
    assert world.balanced()


def test_eos_stop_strings_and_length_end_requests(lm, model):
    world = World(lm, model)
    prompt = lm.tokenizer.encode("Tell me 1")
    full = world.submit(prompt, new=16)
    world.loop.run_until_idle()
    assert full.finish_reason == "length" and len(full.generated) == 16 and eos_of(lm) not in full.generated
    whole = lm.tokenizer.decode(full.generated)
    at = next(i for i, ch in enumerate(whole) if i > 1 and ch.isascii() and ch.isprintable())
    stop = whole[at : at + 2]  # two characters: the first is held back until the second shows
    stopped = world.submit(prompt, new=16, stop=("never", stop))
    world.loop.run_until_idle()
    assert stopped.finish_reason == "stop" and stopped.text.text == whole[:at] and len(stopped.generated) < 16
    assert "".join(c.text for c in world.chunks[1]) == whole[:at] and world.chunks[1][-1].finish_reason == "stop"
    # eos (here a token the tiny model does generate, as the request's eos): it ends the request, uncounted
    eos = world.submit(prompt, new=16)
    eos.eos_token_id = full.generated[3]
    world.loop.run_until_idle()
    cut = full.generated.index(full.generated[3]) + 1
    assert eos.finish_reason == "stop" and eos.generated == full.generated[:cut]
    assert world.chunks[2][-1].completion_tokens == cut - 1 and eos.completion_ids == full.generated[: cut - 1]
    assert world.balanced()


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(lm, model):
    def sampled(together: bool) -> list[int]:
        world = World(lm, model)
        state = world.submit(PROMPTS[0], new=10, temperature=0.9, top_p=0.9, seed=123)
        if together:
            world.submit(PROMPTS[2], new=10, temperature=1.3, seed=5)
            world.submit(PROMPTS[1], new=10)
        state.generator = torch.Generator().manual_seed(123)
        for s in world.states[1:]:
            s.generator = torch.Generator().manual_seed(5) if not s.params.greedy else None
        world.loop.run_until_idle()
        return state.generated

    alone = sampled(False)
    assert sampled(True) == alone and len(alone) >= 1
