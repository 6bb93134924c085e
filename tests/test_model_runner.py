"""ModelRunner + PagedLlama on the tiny random Llama (CPU, float32, reference kernels): greedy tokens equal
transformers' generate with its DynamicCache; exact reuse and release accounting."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import baseline_generate, make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.memory import OutOfBlocksError
from ultra_adaptive_kv_cache_engine.model.decode_step import DecodeStep
from ultra_adaptive_kv_cache_engine.model.paged_llama import LlamaShape, PagedLlama
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, TieredStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from model_runner import DecodeMode, ModelRunner, RunnerConfig  # noqa: E402 - the GPU benches' fixed-batch baseline

NEW = 10
BS = 4


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is much faster on a shared 2-core machine
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model)


def runner(lm, model, num_blocks: int = 64, **config) -> ModelRunner:
    return ModelRunner(model, make_paged(lm, block_size=BS, num_blocks=num_blocks), RunnerConfig(max_context=256, **config))


def eos_of(lm) -> int:
    return int(lm.model.generation_config.eos_token_id)


def hf_tokens(lm, prompt: list[int], new: int = NEW) -> list[int]:
    """transformers' greedy continuation, cut after eos as the runner does."""
    out = baseline_generate(lm, prompt, new)[0, len(prompt) :].tolist()
    return out[: out.index(eos_of(lm)) + 1] if eos_of(lm) in out else out


def released(r: ModelRunner) -> bool:
    stats = r.cache.stats()
    return stats["sequences"] == 0 and r.cache.pool.num_free == r.cache.pool.num_blocks


def test_prefill_logits_equal_transformers_with_and_without_a_cached_prefix(lm, model):
    cache = make_paged(lm, block_size=BS)
    prompt = random_ids(19, seed=3)
    table = torch.arange(5, dtype=torch.int32)  # 5 blocks of 4 tokens hold 19
    with torch.no_grad():
        expected = lm.model(torch.tensor([prompt])).logits[0].float()
    whole = model.prefill(cache.pool.kv, torch.tensor(prompt), 0, table)
    torch.testing.assert_close(whole, expected[-1], rtol=1e-4, atol=1e-5)
    head = model.prefill(cache.pool.kv, torch.tensor(prompt[:11]), 0, table)
    tail = model.prefill(cache.pool.kv, torch.tensor(prompt[11:]), 11, table)  # paged prefill over the prefix
    torch.testing.assert_close(head, expected[10], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tail, expected[-1], rtol=1e-4, atol=1e-5)


def test_single_prompt_equals_generate_and_releases_everything(lm, model):
    r = runner(lm, model)
    prompt = random_ids(22, seed=1)
    out = r.generate([prompt], NEW, eos_of(lm))
    assert list(out.tokens[0]) == hf_tokens(lm, prompt)
    assert out.cached_tokens == (0,) and out.decode_mode is DecodeMode.EAGER and out.graph_error is None
    assert out.decode_steps == len(out.tokens[0]) - 1 == out.decode_tokens
    # 22 prompt tokens -> 5 full blocks; 22 + 9 tokens with KV -> 7 full blocks in all
    assert out.committed_blocks == 7 and r.cache.stats()["indexed_blocks"] == 7
    assert released(r)


def test_a_batch_of_different_lengths_equals_padded_generate(lm, model):
    r = runner(lm, model)
    prompts = [random_ids(n, seed=10 + n) for n in (5, 17, 30)]
    width = max(len(p) for p in prompts)
    pad = lm.tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = baseline_generate(lm, ids, NEW, mask)[:, width:].tolist()
    out = r.generate(prompts, NEW, eos_of(lm))
    for got, want in zip(out.tokens, expected, strict=True):
        want = want[: want.index(eos_of(lm)) + 1] if eos_of(lm) in want else want
        assert list(got) == want
    assert out.cached_tokens == (0, 0, 0) and len(out.ttft_s) == 3
    assert released(r)


def test_a_cached_prefix_is_reused_and_the_output_is_unchanged(lm, model):
    r = runner(lm, model)
    shared = random_ids(24, seed=5)
    first = shared + random_ids(3, seed=6)
    second = shared + random_ids(9, seed=7)
    r.generate([first], NEW, eos_of(lm))
    out = r.generate([second], NEW, eos_of(lm))
    assert out.cached_tokens == (24,)  # the 6 shared full blocks
    assert list(out.tokens[0]) == hf_tokens(lm, second)
    again = r.generate([second], NEW, eos_of(lm))
    assert again.cached_tokens == (32,)  # capped at len - 1 = 32: 8 blocks
    assert again.tokens == out.tokens
    # in one call, a later prompt reuses the prompt blocks an earlier one committed
    third = random_ids(16, seed=8)
    both = r.generate([third, third + [7, 8]], NEW, eos_of(lm))
    assert both.cached_tokens == (0, 16)
    assert list(both.tokens[1]) == hf_tokens(lm, third + [7, 8])
    assert released(r)


def test_generated_tokens_are_written_back_for_the_next_turn(lm, model):
    r = runner(lm, model)
    prompt = random_ids(20, seed=9)
    out = r.generate([prompt], NEW, eos_of(lm))
    turn = prompt + list(out.tokens[0]) + [65, 66]
    with_kv = len(prompt) + len(out.tokens[0]) - 1  # the last generated token has no KV
    nxt = r.generate([turn], NEW, eos_of(lm))
    assert nxt.cached_tokens == (min(with_kv, len(turn) - 1) // BS * BS,)
    assert list(nxt.tokens[0]) == hf_tokens(lm, turn)


def test_chunked_prefill_equals_one_pass(lm, model):
    prompt = random_ids(29, seed=12)
    chunked = runner(lm, model, prefill_chunk=6).generate([prompt], NEW, eos_of(lm))
    assert list(chunked.tokens[0]) == hf_tokens(lm, prompt)


def test_eos_stops_a_row_and_the_others_continue(lm, model):
    prompts = [random_ids(12, seed=20), random_ids(15, seed=21)]
    free = runner(lm, model).generate(prompts, NEW)  # no eos: full length
    stop = free.tokens[0][3]  # make row 0's fourth token the eos
    out = runner(lm, model).generate(prompts, NEW, eos_token_id=stop)
    assert out.tokens[0] == free.tokens[0][: free.tokens[0].index(stop) + 1]
    row1 = free.tokens[1]
    assert out.tokens[1] == (row1[: row1.index(stop) + 1] if stop in row1 else row1)
    assert all(len(t) == NEW for t in free.tokens)


def evict_pool(cache: KVCacheManager) -> None:
    """Reallocate every free block, so that no cached block is left in the pool (the tiers keep theirs)."""
    with cache._lock:
        blocks = cache.pool.allocate_many(cache.pool.num_free)
        cache.pool.free(blocks)


def test_blocks_evicted_from_the_pool_are_promoted_from_the_cpu_tier(lm, model):
    base = make_paged(lm, block_size=BS)
    tier = CPUTier(base.namespace.digest, capacity_bytes=1 << 22, pin_memory=False)
    lower = LowerTiers(TieredStore([tier]), make_codec("identity"))
    cache = KVCacheManager(base.config, base.spec, num_blocks=64, namespace=base.namespace, lower=lower)
    r = ModelRunner(model, cache, RunnerConfig(max_context=256))
    prompt = random_ids(26, seed=30)
    first = r.generate([prompt], NEW, eos_of(lm))
    cache.persist()  # the write-through has reached the tier
    evict_pool(cache)
    assert cache.lookup(prompt).num_tokens == 0 and len(tier) == first.committed_blocks
    out = r.generate([prompt], NEW, eos_of(lm))
    assert out.cached_tokens == (24,) and cache.stats()["tier_hit_tokens"] == 24
    assert out.tokens == first.tokens == (tuple(hf_tokens(lm, prompt)),)
    lower.close()


def test_bad_input_raises_before_anything_is_held(lm, model):
    r = runner(lm, model)
    for prompts, match in [([], "non-empty sequence"), ([[]], r"prompts\[0\]"), (["abc"], r"prompts\[0\]"),
                           ([[1, 2], [3, 400]], "token id 400"), ([[True, 2]], r"prompts\[0\]"),
                           ([list(range(3, 250))], "exceeds the context of 256")]:
        with pytest.raises(ValueError, match=match):
            r.generate(prompts, NEW)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        r.generate([[5, 6]], 0)
    with pytest.raises(ValueError, match="max_context=1"):
        RunnerConfig(max_context=1)
    with pytest.raises(ValueError, match="prefill_chunk=0"):
        RunnerConfig(prefill_chunk=0)
    assert released(r)


def test_a_pool_too_small_raises_and_leaks_nothing(lm, model):
    r = runner(lm, model, num_blocks=12)
    with pytest.raises(OutOfBlocksError, match="free"):
        r.generate([random_ids(20, seed=40), random_ids(21, seed=41)], 30)  # 13 + 13 blocks wanted
    assert released(r)
    out = r.generate([random_ids(20, seed=40)], 9)  # fits: 7 blocks
    assert len(out.tokens[0]) == 9 and released(r)


def test_model_and_cache_must_fit(lm, model):
    other = make_paged(lm, block_size=BS)
    wrong = KVCacheManager(other.config, dataclasses.replace(other.spec, num_kv_heads=1), num_blocks=8)
    with pytest.raises(ValueError, match="is not"):
        ModelRunner(model, wrong)
    with pytest.raises(TypeError, match="PagedLlama"):
        ModelRunner(lm.model, other)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="hidden_act"):
        LlamaShape.from_config(type("C", (), {"hidden_act": "gelu"})())


def test_from_state_dict_equals_from_hf(lm, model):
    twin = PagedLlama.from_state_dict(lm.model.state_dict(), lm.model.config)
    cache = make_paged(lm, block_size=BS)
    prompt = torch.tensor(random_ids(9, seed=50))
    table = torch.arange(3, dtype=torch.int32)
    torch.testing.assert_close(twin.prefill(cache.pool.kv, prompt, 0, table),
                               model.prefill(cache.pool.kv, prompt, 0, table), rtol=0, atol=0)


def test_decode_step_on_cpu_runs_eagerly_and_refuses_to_capture(lm, model):
    cache = make_paged(lm, block_size=BS)
    step = DecodeStep(model, cache.pool.kv, batch=2, table_width=4)
    assert not step.capture() and step.capture_error == "not on CUDA" and not step.captured
    with pytest.raises(ValueError, match="batch 2"):
        step.load([1], [0])
    with pytest.raises(ValueError, match="table_width=0"):
        DecodeStep(model, cache.pool.kv, batch=1, table_width=0)
