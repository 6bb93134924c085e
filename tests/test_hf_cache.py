"""PagedHFCache + generate_with_prefix_cache on the tiny random Llama: exact output, exact accounting."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import PrefillProbe, baseline_generate, make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.model.generation import generate_with_prefix_cache
from ultra_adaptive_kv_cache_engine.model.hf_cache import PagedHFCache
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

NEW = 10

@pytest.fixture(scope="module")
def tiny_lm():
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other for tiny matrices.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture()
def probe(tiny_lm: LoadedModel):
    p = PrefillProbe(tiny_lm)
    yield p
    p.close()


def run(lm, paged, ids, mask=None, new=NEW):
    return generate_with_prefix_cache(lm.model, paged, ids, mask, max_new_tokens=new, do_sample=False)


def test_first_call_misses_then_the_same_prompt_hits(tiny_lm, probe):
    paged = make_paged(tiny_lm, block_size=4)
    prompt = random_ids(22, seed=1)
    expected = baseline_generate(tiny_lm, prompt, NEW)
    probe.widths.clear()
    first = run(tiny_lm, paged, [prompt])
    assert torch.equal(first.output_ids, expected)
    assert (first.cached_tokens, first.prompt_tokens, first.new_tokens) == (0, 22, NEW)
    assert probe.widths[0] == 22  # the whole prompt was prefilled
    # KV exists for prompt + all generated tokens but the last: 31 tokens -> 7 full blocks.
    assert first.committed_blocks == 7
    assert paged.stats()["indexed_blocks"] == 7 and paged.stats()["sequences"] == 0
    probe.widths.clear()
    second = run(tiny_lm, paged, [prompt])
    assert torch.equal(second.output_ids, expected)
    assert second.cached_tokens == 20 and second.row_cached_tokens == (20,)  # 5 full blocks of the prompt
    assert probe.widths[0] == 2  # only the 2 uncached prompt tokens were prefilled
    assert second.committed_blocks == 0 and second.cache_hit


def test_shared_prefix_ending_mid_block(tiny_lm, probe):
    paged = make_paged(tiny_lm, block_size=4)
    shared = random_ids(10, seed=2)  # ends in the middle of block 2
    first, second = shared + random_ids(7, seed=3), shared + random_ids(5, seed=4)
    run(tiny_lm, paged, [first])
    probe.widths.clear()
    result = run(tiny_lm, paged, [second])
    assert torch.equal(result.output_ids, baseline_generate(tiny_lm, second, NEW))
    assert result.cached_tokens == 8  # two full shared blocks; the partial third is recomputed
    assert probe.widths[0] == 15 - 8


def test_multi_turn_chat_reuses_prompt_and_answer(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4)
    codec = tiny_lm.tokenizer
    turn1 = codec.chat([{"role": "user", "content": "hi there"}])
    out1 = run(tiny_lm, paged, [turn1]).output_ids[0].tolist()
    turn2 = out1 + [codec.EOS] + codec.chat([{"role": "user", "content": "and then?"}])
    result = run(tiny_lm, paged, [turn2])
    assert torch.equal(result.output_ids, baseline_generate(tiny_lm, turn2, NEW))
    # Turn 1 left KV for len(out1) - 1 tokens, in full blocks.
    assert result.cached_tokens == (len(out1) - 1) // 4 * 4
    assert result.cached_tokens % 4 == 0 and result.cached_tokens > len(turn1)


def test_fully_cached_prompt_recomputes_only_its_last_token(tiny_lm, probe):
    paged = make_paged(tiny_lm, block_size=4)
    prompt = random_ids(16, seed=5)
    run(tiny_lm, paged, [prompt + random_ids(4, seed=6)])  # caches the 4 blocks of `prompt`
    probe.widths.clear()
    result = run(tiny_lm, paged, [prompt])
    assert torch.equal(result.output_ids, baseline_generate(tiny_lm, prompt, NEW))
    assert result.cached_tokens == 15 and probe.widths[0] == 1


def test_left_padded_batch_reuses_a_prefix_per_row(tiny_lm, probe):
    paged = make_paged(tiny_lm, block_size=4)
    system = random_ids(16, seed=7)
    rows = [system + random_ids(n, seed=10 + n) for n in (3, 9, 6)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    run(tiny_lm, paged, [rows[0]])  # caches the 4 system blocks (+ more of row 0)
    probe.widths.clear()
    result = run(tiny_lm, paged, ids, mask)
    assert torch.equal(result.output_ids, baseline_generate(tiny_lm, ids, NEW, mask))
    # Restart column = min(pad + cached) = min(6 + 16, 0 + 16, 3 + 16) = 16; rows reuse 16 - pad tokens.
    assert result.row_cached_tokens == (10, 16, 13) and result.cached_tokens == 39
    assert probe.widths[0] == width - 16
    for row, tokens in enumerate(rows):  # each row is also what it would be alone
        alone = baseline_generate(tiny_lm, tokens, NEW)[0]
        assert torch.equal(result.output_ids[row, width - len(tokens) :], alone)


def test_seeded_sampling_matches_the_baseline(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4)
    prompt = random_ids(14, seed=14)
    kwargs = {"max_new_tokens": NEW, "do_sample": True, "top_k": 20, "temperature": 1.5}
    run(tiny_lm, paged, [prompt])  # cache the prompt
    torch.manual_seed(123)
    expected = tiny_lm.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 14, dtype=torch.long), **kwargs)
    torch.manual_seed(123)
    result = generate_with_prefix_cache(tiny_lm.model, paged, [prompt], **kwargs)
    assert result.cached_tokens == 12 and torch.equal(result.output_ids, expected)


def test_right_padding_and_holes_are_refused(tiny_lm):
    paged = make_paged(tiny_lm)
    ids = torch.tensor([random_ids(6, seed=1), random_ids(6, seed=2)])
    for mask in ([[1] * 6, [1, 1, 1, 1, 0, 0]], [[1] * 6, [0, 1, 0, 1, 1, 1]], [[1] * 6, [0] * 6]):
        with pytest.raises(ValueError, match="attention_mask row 1"):
            run(tiny_lm, paged, ids, torch.tensor(mask))
    assert paged.stats()["sequences"] == 0


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        ([], {}, "empty"),
        ([[]], {}, "empty"),
        (torch.zeros((1, 0), dtype=torch.long), {}, "empty"),
        ([[1, 2], [3]], {}, "different lengths"),
        ([1.5, 2.0], {}, "integer"),
        ([-1, 4], {}, "negative"),
        ("hello", {}, "list of token ids"),
        ([5] * 500, {"max_new_tokens": 20}, "exceeds the model's context of 512"),
        ([5] * 600, {}, "exceeds the model's context of 512"),
        ([5, 6], {"cache_implementation": "static"}, "cache_implementation"),
        ([5, 6], {"past_key_values": object()}, "past_key_values"),
        ([5, 6], {"use_cache": False}, "use_cache"),
    ],
)
def test_bad_input_is_refused_and_nothing_leaks(tiny_lm, ids, kwargs, message):
    paged = make_paged(tiny_lm)
    with pytest.raises((ValueError, TypeError), match=message):
        generate_with_prefix_cache(tiny_lm.model, paged, ids, **kwargs)
    assert paged.stats()["sequences"] == 0


def test_a_cache_for_another_model_shape_is_refused(tiny_lm):
    other = build_tiny_llama(TinyLlamaSpec(num_layers=3))
    paged = make_paged(other)
    with pytest.raises(ValueError, match="paged cache holds 3 layers"):
        run(tiny_lm, paged, [random_ids(5, seed=1)])


def test_sequences_are_freed_when_generate_fails(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4)
    prompt = random_ids(12, seed=8)
    run(tiny_lm, paged, [prompt])
    with pytest.raises(ValueError):
        run(tiny_lm, paged, [prompt], new=-3)  # generate itself rejects it
    stats = paged.stats()
    assert stats["sequences"] == 0 and stats["free_blocks"] == 64  # cached blocks stay, unpinned
    assert run(tiny_lm, paged, [prompt]).cached_tokens == 11  # all 3 prompt blocks cached: last token recomputed


def test_small_pool_keeps_what_fits_and_output_stays_exact(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4, num_blocks=3)
    prompt = random_ids(30, seed=9)
    result = run(tiny_lm, paged, [prompt])
    assert torch.equal(result.output_ids, baseline_generate(tiny_lm, prompt, NEW))
    assert result.committed_blocks == 3  # 9 full blocks computed; 3 fit
    again = run(tiny_lm, paged, [prompt])
    assert torch.equal(again.output_ids, result.output_ids) and again.cached_tokens == 12


def test_direct_use_with_model_generate(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4)
    ids = torch.tensor([random_ids(13, seed=11)])
    expected = baseline_generate(tiny_lm, ids, 6)
    for cached in (0, 12):
        with PagedHFCache(paged, ids) as cache:
            assert cache.get_seq_length() == cached and cache.row_cached_tokens == (cached,)
            out = tiny_lm.model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
            assert cache.commit(out) == (4 if cached == 0 else 0)  # 18 tokens with KV -> 4 full blocks
        assert torch.equal(out, expected)
    assert paged.stats()["sequences"] == 0


def test_commit_refuses_an_output_of_another_prompt(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4)
    ids = torch.tensor([random_ids(9, seed=12)])
    with PagedHFCache(paged, ids) as cache:
        tiny_lm.model.generate(ids, cache=cache, max_new_tokens=3, do_sample=False)
        with pytest.raises(ValueError, match="does not start with"):
            cache.commit(torch.tensor([random_ids(12, seed=13)]))
    assert paged.stats()["indexed_blocks"] == 0


@pytest.mark.gpu
def test_exact_on_cuda_with_the_pool_on_the_gpu():
    lm = build_tiny_llama(TinyLlamaSpec(), device="cuda")
    paged = make_paged(lm, block_size=4)
    assert paged.pool.kv.device.type == "cuda"
    prompt = random_ids(22, seed=1)
    expected = baseline_generate(lm, torch.tensor([prompt], device="cuda"), NEW)
    for cached in (0, 20):
        result = run(lm, paged, [prompt])
        assert torch.equal(result.output_ids, expected) and result.cached_tokens == cached
