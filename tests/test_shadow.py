"""Shadow verification on a tiny Llama: hits recomputed and compared, a corrupted pool block detected, logged
with its hash, counted (stats and Prometheus) and evicted from the pool and the CPU tier; the sampled share
is exact; `KVCacheManager.evict_blocks` in an 11-block pool; the config field."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch
from model_fixtures import make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.session import ModelSession
from ultra_adaptive_kv_cache_engine.metrics import LOGGER_NAME

PROMPT = "The quick brown fox jumps over the lazy dog. " * 2


def session(fraction: float, **fields) -> ModelSession:
    config = KVCacheConfig(block_size=4, max_new_tokens=3, max_memory=2 * 1024**2, shadow_fraction=fraction,
                           **fields)
    return ModelSession(config, loaded=tiny_model())


def ask(s: ModelSession, text: str) -> dict:
    return asyncio.run(s.process({"action": "process", "text": text, "raw": True, "temperature": 0}))


def test_hits_recomputed_agree_and_are_counted():
    s = session(1.0)
    try:
        assert ask(s, PROMPT)["cached_tokens"] == 0
        second = ask(s, PROMPT + "Again.")
        assert second["cached_tokens"] > 0
        s.shadow.drain()
        stats = s.stats()["shadow"]
        assert (stats["checks"], stats["checked_blocks"], stats["mismatches"]) == (1, second["cached_tokens"] // 4, 0)
        text = s.controllers.metrics.exposition().decode()
        assert "uakv:shadow_checks_total 1.0" in text and "uakv:shadow_mismatches_total 0.0" in text
    finally:
        s.close()


def test_a_corrupted_block_is_detected_logged_and_evicted_from_pool_and_tier(caplog):
    s = session(1.0, cpu_tier_bytes=1 << 20, tier_writes="through")
    try:
        ask(s, PROMPT)
        s.cache.persist()  # the write-through has reached the CPU tier
        prompt_ids = s.encode_request({"text": PROMPT, "raw": True})
        match = s.cache.lookup(prompt_ids)
        bad = 2
        s.cache.kv[match.block_ids[bad]] += 3.0  # what a bad kernel or a forged shared block would leave
        assert all(s.cache.lower.store.contains(h) for h in match.hashes)
        with caplog.at_level(logging.WARNING, logger=LOGGER_NAME):
            ask(s, PROMPT + "Again.")
            s.shadow.drain()
        stats = s.stats()["shadow"]
        assert (stats["checks"], stats["mismatches"], stats["mismatched_blocks"]) == (1, 1, len(match.hashes) - bad)
        assert match.hashes[bad].hex() in caplog.text
        assert s.cache.lookup(prompt_ids).num_tokens == bad * 4  # the bad block and its descendants are gone
        assert [s.cache.lower.store.contains(h) for h in match.hashes] == [True] * bad + [False] * (len(match.hashes) - bad)
        evicted = len(match.hashes) - bad
        assert f"uakv:shadow_mismatched_blocks_total {evicted}.0" in s.controllers.metrics.exposition().decode()
        third = ask(s, PROMPT + "Once more.")  # recomputed, then verified again: clean
        s.shadow.drain()
        assert third["cached_tokens"] >= bad * 4 and s.stats()["shadow"]["mismatches"] == 1
    finally:
        s.close()


def test_the_sampled_share_is_exact_and_zero_starts_nothing():
    s = session(0.25)
    try:
        ask(s, PROMPT)
        for i in range(8):
            ask(s, PROMPT + f"Question {i}?")
        s.shadow.drain()
        assert s.stats()["shadow"]["checks"] == 2  # 8 hits at 25%
    finally:
        s.close()
    off = session(0.0)
    try:
        ask(off, PROMPT)
        ask(off, PROMPT + "Again.")
        assert off.shadow._thread is None and off.stats()["shadow"]["checks"] == 0
    finally:
        off.close()


def test_evict_blocks_unnames_pool_blocks_in_an_11_block_pool():
    cache = make_paged(tiny_model(), block_size=4, num_blocks=11)
    ids = random_ids(12, seed=1)
    seq = cache.new_sequence(ids)
    spec = cache.spec
    kv = [torch.zeros(spec.num_kv_heads, 12, spec.head_dim) for _ in range(spec.num_layers)]
    cache.append(seq, ids, kv, kv)
    cache.commit(seq)
    table = cache.block_table(seq)
    hashes = cache.hash_prompt(ids)
    assert cache.evict_blocks(hashes[1:]) == 2
    assert cache.lookup(ids).num_tokens == 4
    assert cache.evict_blocks(hashes[1:]) == 0  # already gone
    cache.free(seq)
    assert cache.stats()["indexed_blocks"] == 1 and cache.num_free_blocks == 11
    assert cache.pool.free_block_ids()[:2] == [table[1], table[2]]  # unnamed blocks are reused first


def test_shadow_fraction_is_validated():
    with pytest.raises(ValueError, match="shadow_fraction"):
        KVCacheConfig(shadow_fraction=1.5)
    with pytest.raises(ValueError, match="shadow_fraction"):
        KVCacheConfig(shadow_fraction=True)
