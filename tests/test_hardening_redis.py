"""A shared Redis tier trusts nothing it reads, and its faults cost only its hits (issue 15, items 1 and 2)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from redis_server import RedisServer, free_port, redis_or_skip

from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.compression import EncodedTensor, TensorMeta, make_codec
from ultra_adaptive_kv_cache_engine.tiers import RedisTier, encode_block, seal
from ultra_adaptive_kv_cache_engine.types import CodecKind

NS = hashlib.sha256(b"hardening-redis").digest()
SECRET = "s3cret-for-tests-0123456789"


def recs(n: int, value: float = 0.0):
    codec = make_codec("identity")
    return [encode_block(hashlib.sha256(b"h" + bytes([i])).digest(), NS,
                         torch.full((2, 4), float(i) + value, dtype=torch.float32), codec) for i in range(n)]


R = recs(3)
K = [r.block_hash for r in R]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer.start(tmp_path / "redis")
    yield s
    s.stop()


def raw(server: RedisServer) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port)


def forged(key: bytes) -> bytes:
    """What an attacker with only the Redis connection can write: a sound record of zeros under a public name."""
    zeros = EncodedTensor(TensorMeta(CodecKind.IDENTITY, "float32", (2, 4)), bytes(32))
    return seal(key, NS, zeros).to_bytes()


def test_without_a_secret_a_forged_record_is_served_and_a_warning_says_so(server: RedisServer, caplog) -> None:
    tier = RedisTier(NS, server.url)
    assert any("no tier_secret" in r.getMessage() for r in caplog.records)
    raw(server).set(b"uakv:" + NS.hex().encode() + b":" + K[0].hex().encode(), forged(K[0]))
    assert torch.equal(tier.get(K[0]).tensor(), torch.zeros(2, 4))  # the documented risk without a secret


def test_with_a_secret_names_and_values_reveal_nothing_and_forgeries_are_dropped(server: RedisServer) -> None:
    tier = RedisTier(NS, server.url, secret=SECRET)
    assert [r.stored for r in tier.put_many([(k, r) for k, r in zip(K, R, strict=True)])] == [True] * 3
    client = raw(server)
    names = sorted(client.keys(b"*"))
    assert len(names) == 3
    for name in names:  # neither the namespace nor any block hash can be read from names or values
        value = client.get(name)
        assert NS.hex().encode() not in name and NS not in value
        assert all(k.hex().encode() not in name and k not in value for k in K)
    # probing the public name of a prompt's block finds nothing; a forged record there is never read
    public = b"uakv:" + NS.hex().encode() + b":" + K[0].hex().encode()
    assert client.exists(public) == 0
    client.set(public, forged(K[0]))
    assert torch.equal(tier.get(K[0]).tensor(), R[0].tensor())
    # a value moved under another block's name, a forged value under the real name: dropped and counted
    client.set(tier.redis_key(K[1]), client.get(tier.redis_key(K[0])))
    client.set(tier.redis_key(K[2]), b"\0" * 32 + forged(K[2]))
    got = tier.get_many(K)
    assert got[1] is None and got[2] is None and torch.equal(got[0].tensor(), R[0].tensor())
    assert tier.usage().counters["corrupt_dropped"] == 2
    assert client.exists(tier.redis_key(K[1]), tier.redis_key(K[2])) == 0
    # another secret (another deployment) neither finds nor accepts these blocks
    other = RedisTier(NS, server.url, secret=SECRET + "x")
    assert other.get_many(K) == [None, None, None] and not other.contains(K[0])
    with pytest.raises(TypeError, match="secret names"):
        list(tier)


def test_secret_too_short_is_refused() -> None:
    with pytest.raises(ValueError, match="tier_secret must be at least 16 bytes"):
        RedisTier(NS, "redis://127.0.0.1:1/0", secret="short")


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_list_under_a_block_key_is_dropped_not_a_failed_lookup(server: RedisServer, secret: str | None) -> None:
    tier = RedisTier(NS, server.url, secret=secret)
    tier.put(K[0], R[0])
    tier.put(K[2], R[2])
    raw(server).rpush(tier.redis_key(K[1]), b"not", b"a", b"record")
    got = tier.get_many(K)
    assert got[1] is None and torch.equal(got[0].tensor(), R[0].tensor()) and torch.equal(got[2].tensor(), R[2].tensor())
    usage = tier.usage()
    assert usage.healthy and usage.counters["corrupt_dropped"] == 1 and usage.counters["errors"] == 0
    assert raw(server).exists(tier.redis_key(K[1])) == 0
    assert tier.get(K[1]) is None and tier.usage().healthy


@pytest.mark.parametrize(("url", "message"), [
    ("redis://", "names no host"),
    ("redis://:6379/0", "names no host"),
    ("redis://127.0.0.1:99999/0", "1..65535"),
    ("unix://", "socket path"),
    ("unix:///tmp/x.sock?cluster=true", "unix socket"),
    ("http://h:1", "must start with"),
])
def test_bad_urls_fail_at_construction(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisTier(NS, url)
    with pytest.raises(ValueError, match=message):
        KVCacheConfig(redis_url=url)


def test_a_unix_socket_url_works(tmp_path: Path) -> None:
    binary = redis_or_skip()
    sock = tmp_path / "r.sock"
    proc = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            if sock.exists():
                break
            time.sleep(0.01)
        tier = RedisTier(NS, f"unix://{sock}", secret=SECRET)
        assert tier.put(K[0], R[0]).stored
        assert torch.equal(tier.get(K[0]).tensor(), R[0].tensor()) and tier.usage().healthy
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def test_cluster_flag_on_a_standalone_server_degrades_with_a_clear_error(server: RedisServer) -> None:
    tier = RedisTier(NS, server.url + "?cluster=true")
    assert tier.get(K[0]) is None and not tier.put(K[0], R[0]).stored
    usage = tier.usage()
    assert not usage.healthy and "cluster" in usage.last_error.lower()


def test_a_stopped_server_costs_one_read_deadline_then_misses_at_once(server: RedisServer) -> None:
    now = [0.0]
    tier = RedisTier(NS, server.url, read_timeout_s=0.2, retry_interval_s=10.0, clock=lambda: now[0])
    assert tier.put(K[0], R[0]).stored
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        assert tier.get(K[0]) is None  # one read deadline
        usage = tier.usage()
        assert not usage.healthy and "Timeout" in usage.last_error and usage.counters["errors"] == 1
        assert tier.get_many(K) == [None] * 3 and not tier.contains(K[0])  # breaker open: no wait at all
        assert tier.usage().counters["unavailable"] == 2 and tier.usage().counters["errors"] == 1
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    now[0] = 11.0
    assert tier.get(K[0]) is None  # starts the background probe
    tier._prober.join(5)
    assert tier.usage().healthy and torch.equal(tier.get(K[0]).tensor(), R[0].tensor())


def test_a_server_that_never_was_fails_no_request() -> None:
    tier = RedisTier(NS, f"redis://127.0.0.1:{free_port()}/0", secret=SECRET)
    assert tier.get_many(K) == [None] * 3 and not tier.put(K[0], R[0]).stored and not tier.remove(K[0])
    assert not tier.usage().healthy


def test_a_dead_cluster_node_costs_only_hits(tmp_path: Path) -> None:
    from redis_server import start_cluster

    redis_or_skip("redis-cli")
    nodes = start_cluster(tmp_path / "cluster", 3)
    try:
        now = [0.0]
        url = f"redis://127.0.0.1:{nodes[0].port}/0?cluster=true"
        many = [encode_block(hashlib.sha256(b"c" + bytes([i])).digest(), NS, torch.full((2, 4), float(i)),
                             make_codec("identity")) for i in range(24)]
        keys = [r.block_hash for r in many]
        tier = RedisTier(NS, url, secret=SECRET, read_timeout_s=0.5, timeout_s=0.5, clock=lambda: now[0])
        assert all(r.stored for r in tier.put_many([(r.block_hash, r) for r in many]))
        assert all(r is not None for r in tier.get_many(keys))
        nodes[2].stop()
        got = tier.get_many(keys)  # no exception reaches the caller: misses, the breaker opens
        assert got == [None] * 24 or all(g is None or torch.equal(g.tensor(), r.tensor()) for g, r in zip(got, many, strict=True))
        assert tier.get_many(keys) == [None] * 24 and not tier.usage().healthy
        assert tier.usage().counters["errors"] >= 1 and tier.usage().last_error
    finally:
        for node in nodes:
            node.stop()
