"""The press step on the live components: a tiny random Llama (`PagedLlama`, float32, CPU) over a real
`KVCacheManager` of 4-token blocks. The window re-run's attention equals transformers' own; a pressed prompt's
continuation equals transformers' forward with the evicted tokens masked at their true positions."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from model_fixtures import make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.cache.kv_input import gather_layer
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.cache.tier_list import namespace_codec
from ultra_adaptive_kv_cache_engine.compression.pool_formats import get_pool_format
from ultra_adaptive_kv_cache_engine.compression.presses import (
    PRESSES,
    LayerObservation,
    Press,
    PressConfig,
    pressed_block_hashes,
    register_press,
)
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.press_step import PressStep
from ultra_adaptive_kv_cache_engine.engine.sequence_blocks import SequenceBlocks
from ultra_adaptive_kv_cache_engine.engine.staging import StagingBlocks
from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.press_scores import observe, pool_reader

BS = 4
LENGTH = 19  # 4 full blocks and a tail of 3


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model)


def eager_attentions(lm, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """transformers' attention probabilities per layer (1, q_heads, T, T), eager attention."""
    config = lm.model.config
    saved, config._attn_implementation = config._attn_implementation, "eager"
    try:
        with torch.no_grad():
            return lm.model(torch.tensor([ids]), output_attentions=True).attentions
    finally:
        config._attn_implementation = saved


def prefilled(lm, model, prompt: list[int], num_blocks: int = 11):
    """A cache with `prompt` opened, prefilled through PagedLlama and committed, as the paged backend does."""
    cache = make_paged(lm, block_size=BS, num_blocks=num_blocks)
    blocks = SequenceBlocks(cache)
    seq = blocks.open(prompt)
    model.forward_packed(cache.kv, PackedInputs.pack([(prompt, 0, seq.table)], model.device, BS))
    blocks.commit_opened(seq)
    return cache, seq


def test_the_window_rerun_sees_the_attention_transformers_computes(lm, model):
    prompt = random_ids(LENGTH, seed=3)
    cache, seq = prefilled(lm, model, prompt)
    before = cache.kv.clone()
    observed = list(observe(model, pool_reader(cache.kv, seq.table, LENGTH), prompt, 5, need_keys=True))
    assert torch.equal(cache.kv, before)  # the pool is only read
    for layer, (obs, expected) in enumerate(zip(observed, eager_attentions(lm, prompt), strict=True)):
        assert (obs.layer, obs.length, obs.num_kv_heads) == (layer, LENGTH, 2)
        torch.testing.assert_close(obs.attention, expected[0, :, -5:], rtol=0, atol=1e-5)
        keys = cache.read_layer(seq.seq_id, layer)[0].transpose(0, 1)
        assert torch.equal(obs.keys, keys)
    bare = list(observe(model, pool_reader(cache.kv, seq.table, LENGTH), prompt, 0))
    assert [(o.keys, o.attention) for o in bare] == [(None, None)] * 2


def masked_reference(lm, prompt: list[int], cont: list[int], kept: list[int]) -> torch.Tensor:
    """transformers' logits of `cont` after `prompt`, at their true positions, seeing only the `kept` prompt
    tokens (the prompt itself attends causally to all of it)."""
    total = len(prompt) + len(cont)
    mask = torch.tril(torch.ones(total, total, dtype=torch.bool))
    evicted = [t for t in range(len(prompt)) if t not in set(kept)]
    mask[len(prompt) :, evicted] = False
    with torch.no_grad():
        return lm.model(torch.tensor([prompt + cont]), attention_mask=mask[None, None]).logits[0, len(prompt) :].float()


def test_sinks_window_press_on_a_real_cache_then_continue_at_true_positions(lm, model):
    prompt, cont = random_ids(LENGTH, seed=3), random_ids(5, seed=4)
    cache, seq = prefilled(lm, model, prompt)
    assert seq.table == [0, 1, 2, 3, 4] and cache.num_free_blocks == 6
    old = cache.kv[seq.table].clone()
    config = PressConfig("sinks_window", tokens=7)  # rounded up to 2 whole blocks
    step = PressStep(config, model, cache, inv_freq=lm.model.model.rotary_emb.inv_freq)
    result = step.apply(seq.table, prompt)
    assert result is not None
    assert (result.table, result.freed, result.kept, result.length, result.rope_offset) == ((5, 6), (0, 1, 2, 3, 4), 8, 19, 0)
    assert result.indices.tolist() == [[[0, 1, 2, 3, 15, 16, 17, 18]] * 2] * 2
    assert result.hashes == tuple(pressed_block_hashes(prompt, cache.namespace, config, 8))
    assert result.namespace.codec == "identity|press:sinks_window();tokens=7"
    assert cache.num_free_blocks == 4 and torch.equal(cache.kv[seq.table], old)  # the prompt's blocks untouched
    kept = [0, 1, 2, 3, 15, 16, 17, 18]
    for layer in range(2):  # values copied as they are; keys rotated by -(19 - 8) positions
        keys, values = cache.read_layer(seq.seq_id, layer)
        pressed = cache.kv[list(result.table), layer].permute(1, 3, 0, 2, 4).reshape(2, 2, 8, 16)
        assert torch.equal(pressed[1], values[:, kept]) and not torch.equal(pressed[0], keys[:, kept])
    table = [*result.table, *cache.allocate_scratch(2)]
    logits = model.forward_packed(cache.kv, PackedInputs.pack([(cont, result.kept, table)], model.device, BS),
                                  all_logits=True)
    expected = masked_reference(lm, prompt, cont, result.indices[0, 0].tolist())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_without_inv_freq_the_kept_keys_keep_their_rope_and_the_offset_is_returned(lm, model):
    prompt = random_ids(LENGTH, seed=5)
    cache, seq = prefilled(lm, model, prompt)
    result = PressStep(PressConfig("sinks_window", ratio=0.25, params={"sinks": 1}), model, cache).apply(seq.table, prompt)
    assert result is not None and (result.kept, result.rope_offset) == (8, 11)
    kept = [0, 12, 13, 14, 15, 16, 17, 18]
    for layer in range(2):
        keys, values = cache.read_layer(seq.seq_id, layer)
        pressed = cache.kv[list(result.table), layer].permute(1, 3, 0, 2, 4).reshape(2, 2, 8, 16)
        assert torch.equal(pressed[0], keys[:, kept]) and torch.equal(pressed[1], values[:, kept])


def brute_snapkv(attentions, window: int, kernel: int, kept: int, kv_heads: int, pooling: str) -> list[list[list[int]]]:
    """SnapKV's choice computed independently, token by token, from transformers' attention probabilities."""
    chosen = []
    for att in attentions:
        att = att[0].double()  # (q_heads, T, T)
        q_heads, length = att.shape[0], att.shape[-1]
        group, prefix = q_heads // kv_heads, length - window
        layer = []
        for h in range(kv_heads):
            votes = [sum(float(att[q, r, t]) for q in range(h * group, (h + 1) * group)
                         for r in range(length - window, length)) / group for t in range(prefix)]
            near = [[votes[j] for j in range(t - kernel // 2, t + kernel // 2 + 1) if 0 <= j < prefix]
                    for t in range(prefix)]
            pooled = [max(n) if pooling == "max" else sum(n) / kernel for n in near]  # avg counts the padding
            top = sorted(range(prefix), key=lambda t: (-pooled[t], t))[: kept - window]
            layer.append(sorted(top + list(range(prefix, length))))
        chosen.append(layer)
    return chosen


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_press_keeps_what_the_paper_would_per_layer_and_head(lm, model, pooling):
    prompt = random_ids(LENGTH, seed=7)
    cache, seq = prefilled(lm, model, prompt)
    config = PressConfig("snapkv", ratio=0.5, params={"window": 3, "kernel": 3, "pooling": pooling, "sinks": 0,
                                                      "recent": 0})
    result = PressStep(config, model, cache).apply(seq.table, prompt)
    assert result is not None and result.kept == 12 and result.table == (5, 6, 7)
    assert result.indices.tolist() == brute_snapkv(eager_attentions(lm, prompt), 3, 3, 12, 2, pooling)
    assert len({tuple(row) for layer in result.indices.tolist() for row in layer}) > 1  # heads differ


def test_nothing_is_pressed_when_the_budget_keeps_all_or_the_pool_is_full(lm, model):
    prompt = random_ids(LENGTH, seed=8)
    cache, seq = prefilled(lm, model, prompt, num_blocks=7)  # 5 blocks taken, 2 free
    assert PressStep(PressConfig("snapkv", tokens=17), model, cache).kept_tokens(LENGTH) == 19
    assert PressStep(PressConfig("snapkv", tokens=17), model, cache).apply(seq.table, prompt) is None
    assert PressStep(PressConfig("snapkv", ratio=0.6), model, cache).apply(seq.table, prompt) is None  # 3 blocks
    assert cache.num_free_blocks == 2
    result = PressStep(PressConfig("keys_norm", tokens=8), model, cache).apply(seq.table, prompt)
    assert result is not None and result.table == (5, 6) and cache.num_free_blocks == 0


@dataclass(frozen=True)
class _HeadPatternPress(Press):
    """A test press: KV head h keeps every token t with (t + h) % 3 != 0 first, then the latest ones (the same
    choice in every layer), so the heads keep different tokens."""

    name: ClassVar[str] = "test_head_pattern"

    def select(self, obs: LayerObservation, kept: int) -> torch.Tensor:
        rows = []
        for h in range(obs.num_kv_heads):
            liked = [t for t in range(obs.length) if (t + 0 * h) % 3 != 0]
            rest = [t for t in range(obs.length) if t not in liked]
            rows.append(sorted((liked[::-1] + rest[::-1])[:kept]))
        return torch.tensor(rows)


def test_heads_keeping_different_tokens_continue_as_transformers_with_per_head_masks(lm, model):
    prompt, cont = random_ids(LENGTH, seed=9), random_ids(4, seed=10)
    cache, seq = prefilled(lm, model, prompt)
    register_press(_HeadPatternPress)
    try:
        config = PressConfig("test_head_pattern", tokens=12)
        result = PressStep(config, model, cache, inv_freq=lm.model.model.rotary_emb.inv_freq).apply(seq.table, prompt)
    finally:
        PRESSES.pop("test_head_pattern")
    assert result is not None and result.kept == 12
    heads = result.indices[0].tolist()
    assert result.indices[1].tolist() == heads
    table = [*result.table, *cache.allocate_scratch(1)]
    logits = model.forward_packed(cache.kv, PackedInputs.pack([(cont, 12, table)], model.device, BS), all_logits=True)
    q_heads = lm.model.config.num_attention_heads
    total = LENGTH + len(cont)
    mask = torch.tril(torch.ones(q_heads, total, total, dtype=torch.bool))
    for q in range(q_heads):  # query head q reads KV head q // (q_heads // kv_heads)
        evicted = [t for t in range(LENGTH) if t not in set(heads[q // (q_heads // 2)])]
        mask[q, LENGTH:, evicted] = False
    with torch.no_grad():  # a boolean per-head mask (SDPA attention; eager would add booleans as numbers)
        expected = lm.model(torch.tensor([prompt + cont]), attention_mask=mask[None]).logits[0, LENGTH:].float()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


def test_a_quantized_pool_is_read_dequantised_and_the_pressed_blocks_are_sealed(lm, model):
    fmt = "int8"
    config = KVCacheConfig(block_size=BS, kv_dtype=fmt, cpu_tier_bytes=0, device="cpu")
    spec = dataclasses.replace(lm.kv_spec(BS), pool_format=fmt)
    cache = KVCacheManager(config, spec, 11, lm.namespace(spec, namespace_codec(config)))
    staging = StagingBlocks(spec, cache.kv, model.backend, 8)
    prompt = random_ids(LENGTH, seed=11)
    seq = SequenceBlocks(cache).open(prompt)
    staging.open(seq.seq_id, 0)
    staging.stage(seq.seq_id, LENGTH)
    row = staging.row(seq.seq_id, seq.table)
    model.forward_packed(staging.pools, PackedInputs.pack([(prompt, 0, row)], model.device, BS))
    assert staging.seal([(seq.seq_id, LENGTH, seq.table)]) == 4  # the tail (3 tokens) stays in staging
    row = staging.row(seq.seq_id, seq.table)
    assert row[:4] == seq.table[:4] and row[4] >= 11
    tail = staging.pools.staging[row[4] - 11]  # (layers, 2, bs, heads, dim)
    step = PressStep(PressConfig("snapkv", tokens=8, params={"window": 3}), model, cache)
    result = step.apply(row, prompt, pool=staging.pools)
    assert result is not None and (result.kept, result.table, result.freed) == (8, (5, 6), tuple(row))
    layout = get_pool_format(fmt)
    for layer in range(2):
        keys, values = (torch.cat([x[:, :16], tail[layer, kv, :3].transpose(0, 1)], dim=1)  # (heads, 19, dim)
                        for kv, x in enumerate(gather_layer(cache.kv, spec, seq.table[:4], 16, layer)))
        for kv, source in enumerate((keys, values)):
            kept = torch.stack([source[h, result.indices[layer, h]] for h in range(2)], dim=1)  # (8, heads, dim)
            expected = layout.quantize(kept.reshape(2, BS, 2, 16), kv == 0)
            assert torch.equal(cache.kv[list(result.table), layer, kv], expected)
