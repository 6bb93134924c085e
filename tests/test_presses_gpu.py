"""Presses on CUDA (marked gpu, skipped without it): the press step, the observation-window re-run and the
compaction run on the pool's device; a pressed prompt continues through the Triton prefill kernel as
transformers does with the evicted tokens masked at their true positions; on a quantized pool the pressed
blocks are sealed by the Triton seal kernel exactly as the pool format quantizes the kept tokens."""

from __future__ import annotations

import functools

import pytest
import torch
from model_fixtures import random_ids

from ultra_adaptive_kv_cache_engine.cache.kv_input import gather_layer
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression.pool_formats import get_pool_format
from ultra_adaptive_kv_cache_engine.compression.presses import PressConfig
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.press_step import PressStep
from ultra_adaptive_kv_cache_engine.engine.sequence_blocks import SequenceBlocks
from ultra_adaptive_kv_cache_engine.engine.staging import StagingBlocks
from ultra_adaptive_kv_cache_engine.kernels import triton_available
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton"),
]
BS = 16
SPEC = TinyLlamaSpec(num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=2)
LENGTH = 150  # 9 full blocks and a tail of 6


@functools.cache
def cuda_lm() -> LoadedModel:
    return build_tiny_llama(SPEC, "cuda")


def cache_of(model: PagedLlama, fmt: str | None, num_blocks: int = 64) -> KVCacheManager:
    s = model.shape
    config = KVCacheConfig(block_size=BS, device="cuda", kv_dtype=fmt, cpu_tier_bytes=0)
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, model.device, pool_format=fmt)
    return KVCacheManager(config, spec, num_blocks=num_blocks)


@pytest.mark.parametrize("name", ["sinks_window", "snapkv"])
def test_a_pressed_prompt_continues_through_triton_as_transformers_with_a_mask(name):
    lm = cuda_lm()
    model = PagedLlama.from_hf(lm.model, max_positions=512)
    assert model.backend.name == "triton"
    cache = cache_of(model, None)
    prompt, cont = random_ids(LENGTH, seed=1), random_ids(20, seed=2)
    seq = SequenceBlocks(cache).open(prompt)
    model.forward_packed(cache.kv, PackedInputs.pack([(prompt, 0, seq.table)], model.device, BS))
    config = PressConfig(name, ratio=0.4, params={"window": 8} if name == "snapkv" else {})
    result = PressStep(config, model, cache, inv_freq=lm.model.model.rotary_emb.inv_freq).apply(seq.table, prompt)
    assert result is not None and result.kept == 64 and len(result.table) == 4
    table = [*result.table, *cache.allocate_scratch(2)]
    logits = model.forward_packed(cache.kv, PackedInputs.pack([(cont, 64, table)], model.device, BS), all_logits=True)
    q_heads = SPEC.num_heads
    total = LENGTH + len(cont)
    same = all(torch.equal(result.indices[0, 0], result.indices[layer, h]) for layer in range(2) for h in range(2))
    if not same:  # a per-head, per-layer choice cannot be one transformers mask: check the sinks case only
        assert name == "snapkv" and torch.isfinite(logits).all()
        return
    mask = torch.tril(torch.ones(q_heads, total, total, dtype=torch.bool, device="cuda"))
    evicted = [t for t in range(LENGTH) if t not in set(result.indices[0, 0].tolist())]
    mask[:, LENGTH:, evicted] = False
    with torch.no_grad():
        expected = lm.model(torch.tensor([prompt + cont], device="cuda"), attention_mask=mask[None]).logits[0, LENGTH:]
    torch.testing.assert_close(logits, expected.float(), rtol=1e-3, atol=1e-3)


def test_a_quantized_pool_pressed_on_cuda_is_sealed_as_the_format_quantizes():
    model = PagedLlama.from_hf(cuda_lm().model, max_positions=512)
    fmt = "int4"
    cache = cache_of(model, fmt)
    staging = StagingBlocks(cache.spec, cache.kv, model.backend, 16)
    prompt = random_ids(LENGTH, seed=3)
    seq = SequenceBlocks(cache).open(prompt)
    staging.open(seq.seq_id, 0)
    staging.stage(seq.seq_id, LENGTH)
    row = staging.row(seq.seq_id, seq.table)
    model.forward_packed(staging.pools, PackedInputs.pack([(prompt, 0, row)], model.device, BS))
    assert staging.seal([(seq.seq_id, LENGTH, seq.table)]) == 9
    row = staging.row(seq.seq_id, seq.table)
    tail = staging.pools.staging[row[9] - cache.num_blocks]
    result = PressStep(PressConfig("snapkv", tokens=64, params={"window": 8}), model, cache).apply(
        row, prompt, pool=staging.pools)
    assert result is not None and result.kept == 64
    layout = get_pool_format(fmt)
    for layer in range(2):
        keys, values = (torch.cat([x, tail[layer, kv, :6].transpose(0, 1)], dim=1)
                        for kv, x in enumerate(gather_layer(cache.kv, cache.spec, seq.table[:9], 144, layer)))
        for kv, source in enumerate((keys, values)):
            idx = result.indices[layer].to(source.device)
            kept = torch.stack([source[h, idx[h]] for h in range(2)], dim=1)  # (64, heads, dim)
            expected = layout.quantize(kept.reshape(4, BS, 2, -1), kv == 0)
            assert torch.equal(cache.kv[list(result.table), layer, kv], expected)
