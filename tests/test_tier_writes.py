"""When pool blocks go down to the tiers (`KVCacheConfig.tier_writes`): on eviction when every tier is memory
(nothing copied while the pool has room), at commit when a tier is durable (the persistence contract) or when
asked; a block a tier already holds is not written again; a bad value is refused by name."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.prefix import hash_blocks
from ultra_adaptive_kv_cache_engine.types import TierWrites

BS = 4
BLOCKS = 6


def cache_of(num_blocks: int, **fields) -> KVCacheManager:
    config = KVCacheConfig(block_size=BS, device="cpu", cpu_tier_bytes=1 << 20, reject_non_finite=False, **fields)
    spec = KVSpec(2, 1, 4, BS, torch.float32, torch.device("cpu"))
    return KVCacheManager.from_config(config, spec, default_namespace(config, spec), num_blocks=num_blocks)


def committed(cache: KVCacheManager, first_token: int) -> tuple[list[int], torch.Tensor]:
    """A freed sequence of BLOCKS full blocks of seeded KV, committed: (its tokens, its KV)."""
    tokens = list(range(first_token, first_token + BLOCKS * BS))
    seq = cache.new_sequence(tokens)
    cache.append(seq, tokens, None, None)
    kv = torch.randn((BLOCKS, *cache.spec.block_shape), generator=torch.Generator().manual_seed(first_token))
    cache.kv[torch.tensor(cache.block_table(seq))] = kv
    assert cache.commit(seq) == BLOCKS
    cache.free(seq)
    return tokens, kv


def in_tier(cache: KVCacheManager, tokens: list[int]) -> list[bool]:
    assert cache.lower is not None
    cache.lower.flush()
    return [cache.lower.store.contains(h) for h in hash_blocks(tokens, cache.namespace, BS)]


def evict_all(cache: KVCacheManager) -> None:
    with cache._lock:  # every free block handed out again: the pool lets every cached block go
        cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))


def test_a_memory_tier_takes_blocks_when_the_pool_evicts_them_and_gives_them_back_identical():
    cache = cache_of(BLOCKS + 2)
    assert cache.lower is not None and cache.lower.write_on_evict
    tokens, kv = committed(cache, 3)
    assert in_tier(cache, tokens) == [False] * BLOCKS  # nothing copied while the pool has room
    evict_all(cache)
    assert in_tier(cache, tokens) == [True] * BLOCKS
    assert cache.stats()["evicted_written_blocks"] == BLOCKS
    seq = cache.new_sequence(tokens + [1], max_cached_tokens=len(tokens))
    assert cache.num_cached_tokens(seq) == len(tokens)
    assert torch.equal(cache.kv[torch.tensor(cache.block_table(seq)[:BLOCKS])], kv)
    cache.free(seq)
    evict_all(cache)  # promoted blocks evicted again: the tier holds them already, nothing is written twice
    assert cache.stats()["evicted_written_blocks"] == BLOCKS


def test_through_writes_every_committed_block_at_its_commit():
    cache = cache_of(BLOCKS + 2, tier_writes="through")
    assert cache.lower is not None and not cache.lower.write_on_evict
    tokens, _ = committed(cache, 3)
    assert in_tier(cache, tokens) == [True] * BLOCKS
    evict_all(cache)
    assert cache.stats()["evicted_written_blocks"] == 0


def test_auto_writes_through_when_a_tier_is_durable(tmp_path):
    cache = cache_of(BLOCKS + 2, enable_persistence=True, persistence_path=str(tmp_path))
    try:
        assert cache.lower is not None and not cache.lower.write_on_evict
        tokens, _ = committed(cache, 3)
        assert in_tier(cache, tokens) == [True] * BLOCKS
        assert cache.durable_blocks() == BLOCKS
    finally:
        cache.close()
    forced = cache_of(BLOCKS + 2, enable_persistence=True, persistence_path=str(tmp_path / "b"), tier_writes="evict")
    try:
        assert forced.lower is not None and forced.lower.write_on_evict
    finally:
        forced.close()


def test_a_bad_value_is_refused_by_name():
    assert KVCacheConfig(tier_writes="EVICT").tier_writes is TierWrites.EVICT
    with pytest.raises(ValueError, match="tier_writes"):
        KVCacheConfig(tier_writes="sometimes")
