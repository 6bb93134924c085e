"""PrefixCache as a drop-in transformers cache: every generate mode, side by side with DynamicCache.

Each scenario runs `model.generate` twice with the same arguments, once over a fresh `DynamicCache` and once
over ONE `PrefixCache` reused across calls, and asserts token-for-token equal outputs, on the tiny random
Llama and (slow) on the real SmolLM2-135M-Instruct; then the exact life cycle on the tiny model.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch
from model_fixtures import make_paged, random_ids, smollm_model, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import DynamicCache, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, pipeline

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.model.hf_cache import PagedHFCache
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.prefix_cache import PrefixCache
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

NEW = 8


@dataclass(frozen=True)
class Subject:
    lm: LoadedModel
    tokenizer: PreTrainedTokenizerFast  # left padding
    system: str  # a shared prefix of several blocks
    questions: tuple[str, ...]
    draft: torch.nn.Module  # a smaller model with the same vocabulary
    block_size: int

    def texts(self, *which: int) -> list[str]:
        return [self.system + self.questions[i] for i in which]

    def batch(self, *which: int, **kwargs: object) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(self.texts(*which), return_tensors="pt", padding=True, **kwargs)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def cache(self) -> PrefixCache:
        return PrefixCache(make_paged(self.lm, block_size=self.block_size, num_blocks=256))


def _word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def _words(n: int, seed: int) -> str:
    return "".join(f"w{i} " for i in random_ids(n, seed=seed))


def _tiny() -> Subject:
    draft = build_tiny_llama(TinyLlamaSpec(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1, seed=3))
    questions = tuple(_words(n, seed=10 + n) for n in (3, 9, 6))
    return Subject(tiny_model(), _word_tokenizer(320), _words(16, seed=7), questions, draft.model, 4)


def _smollm() -> Subject:
    lm = smollm_model()
    tokenizer = lm.tokenizer.backend
    tokenizer.padding_side = "left"
    draft = build_tiny_llama(TinyLlamaSpec(vocab_size=len(tokenizer), seed=3))
    system = "You are a terse assistant. Answer in one short sentence, always politely and precisely. " * 3
    questions = ("What is the capital of France?", "Name a primary color.", "What do bees make?")
    return Subject(lm, tokenizer, system, questions, draft.model, 16)


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm", marks=pytest.mark.slow)])
def subject(request: pytest.FixtureRequest):
    # One thread: on a shared 2-core machine two OpenMP threads wait on each other for small matrices.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _tiny() if request.param == "tiny" else _smollm()
    torch.set_num_threads(threads)


def side_by_side(subject: Subject, cache: PrefixCache, seed: int = 0, **kwargs: object):
    """(DynamicCache output, PrefixCache output) of the same generate call."""
    model = subject.lm.model
    torch.manual_seed(seed)
    expected = model.generate(**kwargs, cache=DynamicCache(), max_new_tokens=NEW)
    torch.manual_seed(seed)
    got = model.generate(**kwargs, past_key_values=cache, max_new_tokens=NEW)
    return expected, got


def sequences(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.sequences  # type: ignore[attr-defined]


def test_left_padded_greedy_then_a_second_call_reuses_the_first(subject):
    cache = subject.cache()
    first = subject.batch(0, 1)
    expected, got = side_by_side(subject, cache, **first, do_sample=False)
    assert torch.equal(got, expected) and cache.last_reuse.cached_tokens == 0
    second = subject.batch(1, 2)  # question 1 again (all its prompt blocks), question 2 shares the system prompt
    expected, got = side_by_side(subject, cache, **second, do_sample=False)
    assert torch.equal(got, expected)
    bs, mask = subject.block_size, second["attention_mask"]
    real = mask.sum(dim=1).tolist()
    shared = len(subject.tokenizer(subject.system)["input_ids"]) // bs * bs
    past = min(mask.shape[1] - real[0] + (real[0] // bs * bs), mask.shape[1] - real[1] + shared)
    assert cache.last_reuse.row_cached_tokens == tuple(past - (mask.shape[1] - n) for n in real)
    assert cache.last_reuse.cached_tokens > 0 and cache.last_reuse.mode == "greedy"
    cache.close()
    assert cache.manager.stats()["sequences"] == 0


def test_extra_left_padding(subject):
    cache = subject.cache()
    batch = subject.batch(0, 1, 2, pad_to_multiple_of=32)
    assert batch["input_ids"].shape[1] % 32 == 0
    for _ in range(2):  # a miss, then a hit with pads in front of every row
        expected, got = side_by_side(subject, cache, **batch, do_sample=False)
        assert torch.equal(got, expected)
    assert min(cache.last_reuse.row_cached_tokens) > 0


def test_beam_search_with_two_returned_sequences(subject):
    cache = subject.cache()
    batch = subject.batch(0, 2)
    kwargs = {"do_sample": False, "num_beams": 2, "num_return_sequences": 2, "return_dict_in_generate": True}
    for call in range(2):
        expected, got = side_by_side(subject, cache, **batch, **kwargs)
        assert torch.equal(got.sequences, expected.sequences) and got.cache is cache
        assert torch.equal(got.beam_indices, expected.beam_indices)
        mixed = [row for row in expected.beam_indices.tolist() if len({i for i in row if i >= 0}) > 1]
        assert mixed, "no returned sequence mixes beam indices: the reorder path is not exercised"
        assert (cache.last_reuse.cached_tokens > 0) == (call == 1) and cache.last_reuse.mode == "beam search"
    assert len(cache.last_reuse.row_cached_tokens) == 4  # 2 prompts x 2 beams
    cache.close()  # the same beams again: the second call's blocks were all cached by the first
    assert cache.manager.stats()["sequences"] == 0 and cache.manager.stats()["indexed_blocks"] == cache.committed_blocks > 0


def test_seeded_sampling_with_returned_sequences(subject):
    cache = subject.cache()
    batch = subject.batch(1, 2)
    kwargs = {"do_sample": True, "top_k": 20, "temperature": 1.3, "num_return_sequences": 2}
    for seed in (11, 12):
        expected, got = side_by_side(subject, cache, seed=seed, **batch, **kwargs)
        assert torch.equal(got, expected)
    assert cache.last_reuse.mode == "sampling" and cache.last_reuse.cached_tokens > 0


def test_assisted_decoding_with_a_smaller_draft_model(subject):
    cache = subject.cache()
    batch = subject.batch(1)  # assisted decoding takes one row
    for _ in range(2):
        expected, got = side_by_side(subject, cache, **batch, do_sample=False, assistant_model=subject.draft)
        assert torch.equal(got, expected)
        # Assisted decoding's first forward feeds the whole prompt: nothing reused, everything written back.
        assert cache.last_reuse.mode == "assisted decoding" and cache.last_reuse.cached_tokens == 0
    expected, got = side_by_side(subject, cache, **batch, do_sample=False)
    width = batch["input_ids"].shape[1]
    assert torch.equal(got, expected) and cache.last_reuse.cached_tokens == min(width - 1, width // subject.block_size * subject.block_size)


def test_text_generation_pipeline_with_the_cache(subject):
    cache = subject.cache()
    pipe = pipeline("text-generation", model=subject.lm.model, tokenizer=subject.tokenizer)
    texts = subject.texts(0, 1, 2)
    kwargs = {"max_new_tokens": NEW, "do_sample": False, "return_full_text": False}
    expected = pipe(texts, **kwargs)
    assert pipe(texts, cache=cache, **kwargs) == expected
    assert cache.last_reuse.cached_tokens >= len(subject.tokenizer(subject.system)["input_ids"]) // subject.block_size * subject.block_size


# -- life cycle, exact, on the tiny model ---------------------------------------------------------------------
@pytest.fixture()
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


def _greedy(lm: LoadedModel, cache: object, ids: torch.Tensor, new: int = 10) -> torch.Tensor:
    return lm.model.generate(ids, attention_mask=torch.ones_like(ids), cache=cache, max_new_tokens=new, do_sample=False)


def test_blocks_become_visible_at_the_next_start_at_close_and_at_collection(tiny):
    paged = make_paged(tiny, block_size=4)
    prompt = torch.tensor([random_ids(22, seed=1)])
    cache = PrefixCache(paged)
    out = _greedy(tiny, cache, prompt)
    # Generate returned: the prefix blocks are still pinned and the new ones not yet indexed.
    assert paged.stats()["indexed_blocks"] == 0 and paged.stats()["sequences"] == 1
    _greedy(tiny, cache, prompt)  # the second start writes the first back (31 tokens of KV -> 7 blocks)...
    assert cache.committed_blocks == 7 and cache.last_reuse.row_cached_tokens == (20,)
    assert paged.lookup(out[0, :28].tolist()).num_tokens == 28
    cache.close()  # ...close writes the second back (nothing new) and unpins
    assert paged.stats()["sequences"] == 0 and cache.committed_blocks == 7
    other = torch.tensor([random_ids(9, seed=2)])
    cache = PrefixCache(paged)
    _greedy(tiny, cache, other)
    del cache
    gc.collect()  # collection writes the open generation back (18 tokens of KV -> 4 blocks)
    assert paged.stats()["sequences"] == 0 and paged.stats()["indexed_blocks"] == 11


def test_context_manager_and_a_forward_outside_generate_continue_the_generation(tiny):
    paged = make_paged(tiny, block_size=4)
    prompt = torch.tensor([random_ids(10, seed=3)])
    with PrefixCache(paged) as cache:
        out = _greedy(tiny, cache, prompt, new=3)  # KV for 12 tokens
        with torch.no_grad():
            tiny.model(out[:, -1:], cache=cache)  # one more token by hand: 13 tokens, 3 full blocks
        assert cache.get_seq_length() == 13
    assert paged.lookup(out[0, :12].tolist()).num_tokens == 12 and paged.stats()["sequences"] == 0


def test_continuation_with_only_new_tokens_and_the_full_mask(tiny):
    paged = make_paged(tiny, block_size=4)
    prompt = torch.tensor([random_ids(10, seed=4)])
    cache = PrefixCache(paged)
    out = _greedy(tiny, cache, prompt, new=4)  # holds KV for 13 tokens
    full = torch.cat([out, torch.tensor([random_ids(3, seed=5)])], dim=1)  # 17 tokens, the last 4 without KV
    got = tiny.model.generate(full[:, 13:], attention_mask=torch.ones_like(full), cache=cache, max_new_tokens=4, do_sample=False)
    expected = tiny.model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected[:, 13:]) and cache.get_seq_length() == 20
    with pytest.raises(ValueError, match="holds 20"):
        tiny.model.generate(full[:, 14:], attention_mask=torch.ones(1, 21, dtype=torch.long), cache=cache, max_new_tokens=2)
    cache.close()


def test_unsupported_inputs_and_models_are_refused_by_name(tiny):
    paged = make_paged(tiny, block_size=4)
    ids = torch.tensor([random_ids(6, seed=1), random_ids(6, seed=2)])
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    cache = PrefixCache(paged)
    with pytest.raises(ValueError, match="padding_side='left'"):
        tiny.model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2)
    other = build_tiny_llama(TinyLlamaSpec(seed=1)).model
    bound = PrefixCache(paged, model=tiny.model)
    with pytest.raises(ValueError, match="another model's KV"):
        other.generate(ids[:1], cache=bound, max_new_tokens=2)
    with pytest.raises(ValueError, match="greedy from inputs_embeds is not supported"):
        embeds = tiny.model.get_input_embeddings()(ids[:1])
        tiny.model.generate(inputs_embeds=embeds, cache=cache, max_new_tokens=2, do_sample=False)
    sliding = MistralForCausalLM(MistralConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4,
    ))
    with pytest.raises(ValueError, match=r"\['sliding_attention'\] layers"):
        sliding.generate(ids[:1], cache=cache, max_new_tokens=2)
    with PagedHFCache(paged, ids[:1]) as one_call:
        with pytest.raises(ValueError, match="another prompt batch"):
            tiny.model.generate(ids[1:], cache=one_call, max_new_tokens=2)
    with pytest.raises(RuntimeError, match="released"):
        tiny.model.generate(ids[:1], cache=one_call, max_new_tokens=2)
    assert paged.stats()["sequences"] == 0


def test_engine_hf_cache_is_bound_to_the_engine_model(tiny):
    from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
    from ultra_adaptive_kv_cache_engine.engine.engine import UltraAdaptiveKVCacheEngine

    config = KVCacheConfig(block_size=4, max_memory=2 * 1024**2)
    with UltraAdaptiveKVCacheEngine(config, model=tiny) as engine:
        cache = engine.hf_cache()
        assert isinstance(cache.manager, KVCacheManager) and cache.manager.block_size == 4
        prompt = torch.tensor([random_ids(13, seed=6)])
        first = _greedy(tiny, cache, prompt, new=4)
        second = _greedy(tiny, cache, prompt, new=4)
        assert torch.equal(first, second) and cache.last_reuse.cached_tokens == 12
        cache.close()
        assert engine.get_stats()["model"]["sequences"] == 0
        with pytest.raises(ValueError, match="another model's KV"):
            build_tiny_llama(TinyLlamaSpec(seed=1)).model.generate(prompt, cache=engine.hf_cache(), max_new_tokens=2)
