"""The full-precision residual window of a quantized pool (`KVCacheConfig.kv_residual_tokens`): staging blocks
stay the read source of a sequence's last tokens after their blocks are sealed (exact sealed counts, rows and
free staging blocks), the live path's greedy tokens equal the bench harness's with the same window and the
unquantized pool's when the window covers the whole sequence, and the committed blocks hold exactly the
quantized KV of the prompt, so prefix reuse is unchanged (tiny random Llama, CPU, float32)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import random_ids, tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.cache.tier_list import namespace_codec
from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS, get_pool_format
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.staging import StagingBlocks
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.model.kv_views import QuantPool
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kv_quality_parts import QuantKVRunner, greedy  # noqa: E402

BS = 4
PROMPT = random_ids(23, seed=31)


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model, max_positions=256)


def make_cache(lm, fmt: str | None, residual: int, num_blocks: int = 64) -> KVCacheManager:
    config = KVCacheConfig(block_size=BS, kv_dtype=fmt, kv_residual_tokens=residual, cpu_tier_bytes=0, device="cpu")
    spec = dataclasses.replace(lm.kv_spec(BS), pool_format=fmt)
    return KVCacheManager(config, spec, num_blocks, lm.namespace(spec, namespace_codec(config)))


def run(lm, model, cache: KVCacheManager, prompts: list[list[int]], new: int) -> list[SequenceState]:
    backend = PagedLlamaBackend(model, cache, SchedulerConfig())
    loop = StepLoop(Scheduler(backend, SchedulerConfig(admission_headroom=0.0)), threaded=False)
    states = []
    for prompt in prompts:
        state = SequenceState(prompt=list(prompt), params=SamplingParams(max_new_tokens=new),
                              text=IncrementalText(lm.tokenizer.decode, ()), eos_token_id=None)
        states.append(state)
        loop.submit(state, lambda item: True)
        loop.run_until_idle()  # one request at a time: the second one reuses the first's blocks
    staging = backend.staging
    assert staging is None or staging.num_free == staging.capacity  # every staging block given back
    return states


def test_sealed_blocks_stay_staged_while_inside_the_window(lm, model):
    cache = make_cache(lm, "int4", 6, num_blocks=11)
    staging = StagingBlocks(cache.spec, cache.kv, model.backend, 8, residual=6)
    table = cache.allocate_scratch(5)
    staging.open(7, 0)
    staging.stage(7, 10)  # blocks 0, 1, 2 (the last one partial)
    assert staging.row(7, table) == [11, 12, 13, *table[3:]] and staging.num_free == 5
    staging.pools.staging.normal_()
    fp = staging.pools.staging[:2].clone()
    # 10 tokens: blocks 0 and 1 are full and sealed; the window (tokens 4..9) still covers block 1
    assert staging.seal([(7, 10, table)]) == 2
    assert (staging.sealed_blocks(7), staging.pool_blocks(7)) == (2, 1)
    assert staging.row(7, table) == [table[0], 12, 13, *table[3:]] and staging.num_free == 6
    fmt = get_pool_format("int4")
    for b in range(2):  # both sealed blocks hold their quantized bytes, the windowed one too
        for layer in range(fp.shape[1]):
            for kv in (0, 1):
                expected = fmt.quantize(fp[b, layer, kv][None], kv == 0)[0]
                assert torch.equal(cache.kv[table[b], layer, kv], expected)
    staging.stage(7, 14)  # block 3
    assert staging.row(7, table) == [table[0], 12, 13, 11, table[4]]
    assert staging.seal([(7, 14, table)]) == 1  # block 2 sealed; the window (8..13) leaves block 1
    assert (staging.sealed_blocks(7), staging.pool_blocks(7)) == (3, 2)
    assert staging.row(7, table) == [table[0], table[1], 13, 11, table[4]] and staging.num_free == 6
    staging.close(7)
    assert staging.num_free == 8


def test_without_a_window_a_sealed_block_is_read_from_the_pool_at_once(lm, model):
    cache = make_cache(lm, "int8", 0, num_blocks=11)
    staging = StagingBlocks(cache.spec, cache.kv, model.backend, 4)
    table = cache.allocate_scratch(3)
    staging.open(1, 0)
    staging.stage(1, 9)
    assert staging.seal([(1, 9, table)]) == 2
    assert staging.row(1, table) == [table[0], table[1], 13] and staging.num_free == 3
    with pytest.raises(ValueError, match="residual=-1 must be a non-negative int"):
        StagingBlocks(cache.spec, cache.kv, model.backend, 4, residual=-1)


def test_a_window_over_the_whole_sequence_decodes_as_the_unquantized_pool(lm, model):
    [plain] = run(lm, model, make_cache(lm, None, 0), [PROMPT], 8)
    [windowed] = run(lm, model, make_cache(lm, "int2", 64), [PROMPT], 8)
    [sealed] = run(lm, model, make_cache(lm, "int2", 0), [PROMPT], 8)
    assert windowed.generated == plain.generated
    assert sealed.generated != plain.generated  # int2 without the window reads the quantized prompt


@pytest.mark.parametrize("fmt", ["int2", "int4"])
def test_the_live_path_decodes_as_the_bench_harness_with_the_same_window(lm, model, fmt):
    [state] = run(lm, model, make_cache(lm, fmt, 6), [PROMPT], 10)
    cache = make_cache(lm, fmt, 6)
    runner = QuantKVRunner(fmt, model, cache, QuantPool, POOL_FORMATS[fmt], 32, residual=6)
    seq = runner.open()
    logits = runner.forward(seq, PROMPT, all_logits=False)[-1]
    assert state.generated == greedy(runner, seq, logits, 10)


def test_committed_blocks_hold_the_quantized_prompt_and_are_reused(lm, model):
    """The window does not delay naming: the prompt's 5 full blocks are sealed and committed at the end of its
    prefill (the last ones while the sequence still reads them in full precision), holding exactly the pool
    format's quantisation of the KV the unquantized pool holds; a second request reuses them."""
    plain, quant = make_cache(lm, None, 0), make_cache(lm, "int4", 64)
    run(lm, model, plain, [PROMPT], 1)
    first, again = run(lm, model, quant, [PROMPT, PROMPT], 4)
    fmt = get_pool_format("int4")
    blocks, sealed = plain.lookup(PROMPT).block_ids, quant.lookup(PROMPT).block_ids
    assert len(sealed) == 5  # the prompt's full blocks
    for fp_block, q_block in zip(blocks[:5], sealed, strict=True):
        for layer in range(plain.kv.shape[1]):
            for kv in (0, 1):
                expected = fmt.quantize(plain.kv[fp_block, layer, kv][None], kv == 0)[0]
                assert torch.equal(quant.kv[q_block, layer, kv], expected)
    assert (first.cached_tokens, again.cached_tokens) == (0, 20)


@pytest.mark.parametrize(("fmt", "configured", "expected"),
                         [("int2", None, 256), ("int4", None, 128), ("fp8", None, 128), ("int8", None, 128),
                          ("int2", 0, 0), ("int4", 64, 64)])
def test_the_backend_reads_the_formats_own_window_unless_one_is_configured(lm, model, fmt, configured, expected):
    config = KVCacheConfig(block_size=BS, kv_dtype=fmt, kv_residual_tokens=configured, cpu_tier_bytes=0,
                           device="cpu")
    spec = dataclasses.replace(lm.kv_spec(BS), pool_format=fmt)
    cache = KVCacheManager(config, spec, 16, lm.namespace(spec, namespace_codec(config)))
    backend = PagedLlamaBackend(model, cache, SchedulerConfig())
    assert backend.staging is not None and backend.staging.residual == expected


@pytest.mark.parametrize("bad", [-1, 1.5, "128", True])
def test_a_bad_window_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="kv_residual_tokens"):
        KVCacheConfig(kv_dtype="int2", kv_residual_tokens=bad)
