"""RedisTier against a real redis-server: key layout, bad values, outages and reconnection, cluster spread."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from redis_server import RedisServer, free_port

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, RedisTier, TieredStore, encode_block
from ultra_adaptive_kv_cache_engine.tiers.redis_tier import split_cluster_flag

NS = hashlib.sha256(b"redis-tests").digest()
OTHER = hashlib.sha256(b"another-tenant").digest()
LOGGER = "ultra_adaptive_kv_cache_engine.tiers"


def recs(n: int, namespace: bytes = NS):
    codec = make_codec("identity")
    return [encode_block(hashlib.sha256(b"r" + bytes([i])).digest(), namespace,
                         torch.full((3, 5), float(i), dtype=torch.float16), codec) for i in range(n)]


R = recs(4)
K = [r.block_hash for r in R]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer.start(tmp_path / "redis")
    yield s
    s.stop()


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port)


def test_keys_are_prefix_namespace_hash_and_values_are_records(server: RedisServer) -> None:
    tier = RedisTier(NS, server.url, prefix="kv:", ttl_s=100)
    tier.put(K[0], R[0])
    name = b"kv:" + NS.hex().encode() + b":" + K[0].hex().encode()
    assert tier.redis_key(K[0]) == name
    client = raw(server)
    assert client.get(name) == R[0].to_bytes()
    assert 0 < client.ttl(name) <= 100
    assert client.keys(b"*") == [name]


def test_put_many_sends_runs_of_records_through_one_reused_buffer(server: RedisServer, monkeypatch) -> None:
    from ultra_adaptive_kv_cache_engine.tiers import redis_tier

    many = recs(7)
    monkeypatch.setattr(redis_tier, "STAGING_BYTES", 2 * many[0].nbytes)  # runs of two records
    tier = RedisTier(NS, server.url, ttl_s=100)
    assert [r.stored for r in tier.put_many([(r.block_hash, r) for r in many])] == [True] * 7
    client = raw(server)
    assert [client.get(tier.redis_key(r.block_hash)) for r in many] == [r.to_bytes() for r in many]
    assert all(0 < client.ttl(tier.redis_key(r.block_hash)) <= 100 for r in many)
    assert len(tier._staging.buf) == 2 * many[0].nbytes  # never grown past one run
    assert tier.usage().counters["bytes_in"] == 7 * many[0].nbytes


@pytest.mark.parametrize("kind", ["garbage", "other_namespace", "other_block", "truncated"])
def test_bad_values_are_never_served_counted_and_deleted(server: RedisServer, kind: str) -> None:
    tier = RedisTier(NS, server.url)
    tier.put(K[1], R[1])
    values = {
        "garbage": b"\x00not a record at all",
        "other_namespace": recs(1, OTHER)[0].to_bytes(),  # block 0 of another tenant, under our key for block 0
        "other_block": R[1].to_bytes(),
        "truncated": R[0].to_bytes()[:-3],
    }
    raw(server).set(tier.redis_key(K[0]), values[kind])
    assert tier.get(K[0]) is None
    assert tier.get_many([K[0], K[1]])[0] is None  # (already deleted: a plain miss now)
    counters = tier.usage().counters
    expected = "namespace_dropped" if kind == "other_namespace" else "corrupt_dropped"
    assert counters[expected] == 1 and counters["corrupt_dropped"] + counters["namespace_dropped"] == 1
    assert raw(server).exists(tier.redis_key(K[0])) == 0
    assert torch.equal(tier.get(K[1]).tensor(), R[1].tensor())


def test_redis_killed_mid_run_gives_misses_then_reconnects(server: RedisServer, caplog) -> None:
    now = [0.0]
    tier = RedisTier(NS, server.url, retry_interval_s=5.0, clock=lambda: now[0])
    assert tier.put(K[0], R[0]).stored and tier.get(K[0]) is not None
    server.stop()
    caplog.set_level(logging.INFO, logger=LOGGER)
    assert tier.get(K[0]) is None  # a real failed call: counted, logged
    assert tier.put(K[1], R[1]).stored is False  # within the retry interval: skipped at once
    assert (tier.contains(K[0]), tier.remove(K[0]), list(tier), tier.get_many(K[:2])) == (False, False, [], [None, None])
    usage = tier.usage()
    assert not usage.healthy and "ConnectionError" in usage.last_error
    assert (usage.counters["errors"], usage.counters["unavailable"]) == (1, 5)
    now[0] = 6.0
    assert tier.get(K[0]) is None  # breaker still open: a miss at once; a background probe tries again
    tier._prober.join(5)
    assert tier.usage().counters["errors"] == 2  # the probe failed: still down
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert sum("serving misses" in w for w in warnings) == 1
    server.restart()  # same port, empty (no persistence configured)
    now[0] = 12.0
    assert tier.get(K[0]) is None  # the request never waits on the probe
    tier._prober.join(5)
    assert tier.get(K[0]) is None and tier.usage().counters["misses"] >= 1  # reachable again: a true miss
    assert tier.put(K[0], R[0]).stored and torch.equal(tier.get(K[0]).tensor(), R[0].tensor())
    usage = tier.usage()
    assert usage.healthy and usage.counters["reconnects"] == 1
    assert any("reachable again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)


def test_a_server_that_never_was_is_only_misses() -> None:
    tier = RedisTier(NS, f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)
    assert tier.get(K[0]) is None and not tier.contains(K[0]) and not tier.put(K[0], R[0]).stored
    assert not tier.usage().healthy and tier.usage().counters["errors"] == 1


def test_cluster_flag_in_url() -> None:
    assert split_cluster_flag("redis://h:7000/0?cluster=true&db=1") == ("redis://h:7000/0?db=1", True)
    assert split_cluster_flag("redis://h:7000/0") == ("redis://h:7000/0", False)
    assert split_cluster_flag("redis://h:7000/0?cluster=0") == ("redis://h:7000/0", False)
    with pytest.raises(ValueError, match="redis://"):
        RedisTier(NS, "http://h:1")
    with pytest.raises(ValueError, match="ttl_s"):
        RedisTier(NS, "redis://h:1", ttl_s=0)


def test_a_store_persists_cpu_blocks_into_redis(server: RedisServer) -> None:
    def store() -> TieredStore:
        return TieredStore([CPUTier(NS, 1 << 20, pin_memory=False), RedisTier(NS, server.url)])

    first = store()
    first.put_many([(r.block_hash, r) for r in R[:3]])
    assert raw(server).dbsize() == 0  # nothing left the process yet
    result = first.flush()
    assert result.keys == tuple(K[:3]) and result.sizes == tuple(r.nbytes for r in R[:3])
    assert first.flush().keys == ()
    second = store()  # another process, another server instance: same blocks
    assert [g.to_bytes() for g in second.get_many(K[:3])] == [r.to_bytes() for r in R[:3]]
    assert sorted(second.tiers[0]) == sorted(K[:3])

