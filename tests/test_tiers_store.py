"""CPUTier eviction and TieredStore promotion/demotion/persistence, in tiny worlds with exact contents."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, DiskTier, TieredStore, encode_block

NS = hashlib.sha256(b"store-tests").digest()


def recs(n: int):
    codec = make_codec("identity")
    return [encode_block(hashlib.sha256(bytes([i])).digest(), NS, torch.full((4, 8), float(i)), codec)
            for i in range(n)]


R = recs(8)
SIZE = R[0].nbytes
K = [r.block_hash for r in R]


def cpu(blocks: int, name: str = "cpu") -> CPUTier:
    return CPUTier(NS, blocks * SIZE, pin_memory=False, name=name)


def test_cpu_tier_evicts_lru_and_returns_the_victims() -> None:
    tier = cpu(3)
    for r in R[:3]:
        assert tier.put(r.block_hash, r).evicted == ()
    tier.get(K[0])  # K1 is now least recently used
    result = tier.put(K[3], R[3])
    assert result.stored and [e.block_hash for e in result.evicted] == [K[1]]
    assert sorted(tier) == sorted([K[0], K[2], K[3]])
    usage = tier.usage()
    assert (usage.used_bytes, usage.num_blocks, usage.counters["evictions"]) == (3 * SIZE, 3, 1)
    assert tier.put(K[0], R[0]) == tier.put(K[0], R[0])  # same block again: a use, no eviction
    assert sorted(tier) == sorted([K[0], K[2], K[3]])


def test_cpu_tier_refuses_what_can_never_fit() -> None:
    tier = CPUTier(NS, SIZE - 1, pin_memory=False)
    result = tier.put(K[0], R[0])
    assert not result.stored and "exceeds capacity" in result.reason
    assert tier.usage().counters["rejected"] == 1 and len(tier) == 0


def test_cpu_tier_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="capacity_bytes"):
        CPUTier(NS, 0)
    with pytest.raises(ValueError, match="unknown eviction policy"):
        CPUTier(NS, 10, policy="nope", pin_memory=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            CPUTier(NS, 10, pin_memory=True)


def test_eviction_demotes_and_a_hit_promotes(tmp_path: Path) -> None:
    top, disk = cpu(2), DiskTier(NS, tmp_path, 3 * SIZE)
    store = TieredStore([top, disk])
    for r in R[:3]:
        assert store.put(r.block_hash, r).stored
    assert sorted(top) == sorted(K[1:3]) and list(disk) == [K[0]]
    got = store.get(K[0])  # a disk hit: promoted to cpu; cpu evicts K1, which is demoted to disk
    assert got is not None and torch.equal(got.tensor(), R[0].tensor())
    assert sorted(top) == sorted([K[0], K[2]]) and sorted(disk) == sorted([K[0], K[1]])
    counters = store.usage().counters
    assert (counters["promotions"], counters["demotions"], counters["hits"]) == (1, 2, 1)
    assert top.usage().counters["misses"] == 1 and disk.usage().counters["hits"] == 1


def test_what_falls_off_the_last_tier_is_dropped_and_counted() -> None:
    store = TieredStore([cpu(1, "a"), cpu(1, "b")])
    for r in R[:3]:
        store.put(r.block_hash, r)
    assert list(store.tiers[0]) == [K[2]] and list(store.tiers[1]) == [K[1]]
    assert store.usage().counters["dropped"] == 1
    assert store.get(K[0]) is None and store.usage().counters["misses"] == 1


def test_a_refusing_tier_passes_the_block_on(tmp_path: Path) -> None:
    small, disk = CPUTier(NS, SIZE - 1, pin_memory=False), DiskTier(NS, tmp_path, 4 * SIZE)
    store = TieredStore([small, disk])
    assert store.put(K[0], R[0]).stored and list(disk) == [K[0]] and len(small) == 0
    assert store.get(K[0]) is not None  # promotion into a tier that refuses is harmless
    with pytest.raises(ValueError, match="one namespace"):
        TieredStore([small, DiskTier(hashlib.sha256(b"other").digest(), tmp_path, SIZE)])
    with pytest.raises(ValueError, match="non-empty"):
        TieredStore([])


def test_flush_persists_volatile_blocks_and_a_new_store_warm_starts(tmp_path: Path) -> None:
    store = TieredStore([cpu(4), DiskTier(NS, tmp_path, 8 * SIZE, fsync="batch")])
    for r in R[:3]:
        store.put(r.block_hash, r)
    assert len(store.tiers[1]) == 0
    result = store.flush()
    assert sorted(result.keys) == sorted(K[:3]) and result.nbytes == 3 * SIZE
    assert store.flush().keys == ()  # nothing new since
    reborn = TieredStore([cpu(4), DiskTier(NS, tmp_path, 8 * SIZE)])
    assert [reborn.contains(k) for k in K[:4]] == [True, True, True, False]
    got = reborn.get_many(K[:4])
    assert [torch.equal(g.tensor(), r.tensor()) for g, r in zip(got[:3], R, strict=False)] == [True] * 3
    assert got[3] is None and sorted(reborn.tiers[0]) == sorted(K[:3])


def test_remove_reaches_every_tier(tmp_path: Path) -> None:
    store = TieredStore([cpu(1), DiskTier(NS, tmp_path, 4 * SIZE)])
    store.put(K[0], R[0])
    store.put(K[1], R[1])
    store.get(K[0])  # now in both tiers
    assert store.remove(K[0]) and not store.contains(K[0]) and not store.remove(K[0])
