"""Promotion from the CPU tier in runs (`LowerTiers.fetch_runs`): a long cached prefix comes back whole and
byte-identical, a miss inside a later run stops the promotion there, and a pool with fewer free blocks than the
chain promotes exactly what fits."""

from __future__ import annotations

import torch

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import PROMOTION_RUN
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.prefix import hash_blocks

BS = 4
CHAIN = 2 * PROMOTION_RUN + 5  # two whole runs and a short third one


def cached_prefix(num_blocks: int) -> tuple[KVCacheManager, list[int], torch.Tensor]:
    """A cache whose CPU tier holds the CHAIN full blocks of `prompt` (written there when the pool evicted them: a
    CPU tier alone takes blocks on eviction), and their KV."""
    config = KVCacheConfig(block_size=BS, device="cpu", cpu_tier_bytes=1 << 22, reject_non_finite=False)
    spec = KVSpec(2, 1, 4, BS, torch.float32, torch.device("cpu"))
    cache = KVCacheManager.from_config(config, spec, default_namespace(config, spec), num_blocks=num_blocks)
    prompt = list(range(3, 3 + CHAIN * BS + 1))
    seq = cache.new_sequence(prompt[:-1])
    cache.append(seq, prompt[:-1], None, None)
    table = torch.tensor(cache.block_table(seq))
    kv = torch.randn((CHAIN, *spec.block_shape), generator=torch.Generator().manual_seed(0))
    cache.kv[table] = kv
    cache.commit(seq)
    cache.free(seq)
    assert cache.lower is not None
    assert not any(cache.lower.store.contains(h) for h in hash_blocks(prompt[:-1], cache.namespace, BS))
    with cache._lock:  # every free block reallocated: nothing cached is left in the pool, the CPU tier takes it
        cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))
    cache.lower.flush()
    assert cache.stats()["evicted_written_blocks"] == CHAIN
    return cache, prompt, kv


def promote(cache: KVCacheManager, prompt: list[int]) -> tuple[int, torch.Tensor]:
    """(tokens promoted by a new sequence over `prompt`, the KV of its reused blocks)."""
    before = cache.stats()["tier_hit_tokens"]
    seq = cache.new_sequence(prompt, max_cached_tokens=len(prompt) - 1)
    table = torch.tensor(cache.block_table(seq)[: cache.num_cached_tokens(seq) // BS], dtype=torch.long)
    return cache.stats()["tier_hit_tokens"] - before, cache.kv[table].clone()


def test_a_prefix_of_several_runs_comes_back_whole_and_identical():
    cache, prompt, kv = cached_prefix(CHAIN + 8)
    promoted, loaded = promote(cache, prompt)
    assert promoted == CHAIN * BS
    assert torch.equal(loaded, kv)


def test_a_miss_in_a_later_run_stops_the_promotion_there():
    cache, prompt, kv = cached_prefix(CHAIN + 8)
    missing = PROMOTION_RUN + 3
    hashes = hash_blocks(prompt[:-1], cache.namespace, BS)
    assert cache.lower is not None and len(cache.lower.fetch_chain(hashes)) == CHAIN
    assert cache.lower.store.remove(hashes[missing])
    promoted, loaded = promote(cache, prompt)
    assert promoted == missing * BS
    assert torch.equal(loaded, kv[:missing])


def test_a_small_pool_promotes_the_blocks_that_fit():
    cache, prompt, kv = cached_prefix(CHAIN)
    cache.pool.allocate_many(CHAIN - PROMOTION_RUN - 2)  # held: PROMOTION_RUN + 2 blocks stay free
    promoted, loaded = promote(cache, prompt)
    assert promoted == (PROMOTION_RUN + 2) * BS
    assert torch.equal(loaded, kv[: PROMOTION_RUN + 2])
