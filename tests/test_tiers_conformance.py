"""Tier conformance: the same contract for every tier kind (CPU, disk, Redis, Redis Cluster, a tiered store).

Each case builds tiers over ONE shared backing (a folder, a server) so that tenant isolation is tested for real:
two namespaces on the same disk folder or the same Redis never see each other's blocks.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from redis_server import RedisServer, start_cluster

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import (
    CPUTier,
    DiskTier,
    RedisTier,
    SegmentDiskTier,
    Tier,
    TieredStore,
    borrow_block,
    encode_block,
    make_tier,
)

NS_A = hashlib.sha256(b"tenant-a").digest()
NS_B = hashlib.sha256(b"tenant-b").digest()
Factory = Callable[[bytes], Tier]


def records(namespace: bytes, n: int, salt: bytes = b""):
    codec = make_codec("identity")
    return [
        encode_block(hashlib.sha256(salt + bytes([i])).digest(), namespace,
                     torch.full((2, 4, 8), float(i), dtype=torch.bfloat16), codec)
        for i in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def redis_single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer.start(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(tmp_path_factory.mktemp("cluster"), 3)
    yield servers
    for server in servers:
        server.stop()


@pytest.fixture(params=["cpu", "disk", "disk_segments", "redis", "redis_cluster", "store"])
def factory(request: pytest.FixtureRequest, tmp_path: Path) -> Factory:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    kind = request.param
    if kind == "cpu":
        return lambda ns: CPUTier(ns, 1 << 20, pin_memory=False)
    if kind == "disk":
        return lambda ns: DiskTier(ns, tmp_path / "blocks", 1 << 20)
    if kind == "disk_segments":
        return lambda ns: SegmentDiskTier(ns, tmp_path / "blocks", 1 << 20, segment_bytes=1024)
    if kind == "redis":
        url = request.getfixturevalue("redis_single").url
        return lambda ns: RedisTier(ns, url, prefix=prefix)
    if kind == "redis_cluster":
        url = request.getfixturevalue("redis_cluster")[0].url + "?cluster=true"
        return lambda ns: RedisTier(ns, url, prefix=prefix)
    return lambda ns: TieredStore([CPUTier(ns, 600, pin_memory=False), DiskTier(ns, tmp_path / "blocks", 1 << 20)])


def test_put_get_contains_remove(factory: Factory) -> None:
    tier = factory(NS_A)
    recs = records(NS_A, 4)
    for r in recs:
        assert tier.put(r.block_hash, r).stored
    for r in recs:
        assert tier.contains(r.block_hash)
        got = tier.get(r.block_hash)
        assert got is not None and got.to_bytes() == r.to_bytes()
        assert torch.equal(got.tensor(), r.tensor())
    assert tier.remove(recs[0].block_hash) is True
    assert tier.remove(recs[0].block_hash) is False
    assert not tier.contains(recs[0].block_hash) and tier.get(recs[0].block_hash) is None
    assert sorted(tier) == sorted(r.block_hash for r in recs[1:])


def test_batched_variants_keep_order(factory: Factory) -> None:
    tier = factory(NS_A)
    recs = records(NS_A, 5)
    results = tier.put_many([(r.block_hash, r) for r in recs[:3]])
    assert [res.stored for res in results] == [True, True, True]
    got = tier.get_many([recs[2].block_hash, recs[4].block_hash, recs[0].block_hash])
    assert [g.block_hash if g else None for g in got] == [recs[2].block_hash, None, recs[0].block_hash]
    assert tier.get_many([]) == []


def test_counters(factory: Factory) -> None:
    tier = factory(NS_A)
    r = records(NS_A, 1)[0]
    tier.put(r.block_hash, r)
    tier.get(r.block_hash)
    tier.get(records(NS_A, 1, b"absent")[0].block_hash)
    counters = tier.usage().counters
    assert (counters["hits"], counters["misses"]) == (1, 1)
    if not isinstance(tier, TieredStore):
        assert counters["bytes_in"] == counters["bytes_out"] == r.nbytes
        assert counters["puts"] == 1
        assert counters["errors"] == counters["corrupt_dropped"] == 0


def test_tenants_never_see_each_other(factory: Factory) -> None:
    tier_a, tier_b = factory(NS_A), factory(NS_B)
    block = torch.ones(2, 4, 8)
    key = hashlib.sha256(b"same prompt, same key").digest()  # even a colliding block hash stays apart
    rec_a = encode_block(key, NS_A, block, make_codec("identity"))
    rec_b = encode_block(key, NS_B, block * 2, make_codec("identity"))
    assert tier_a.put(key, rec_a).stored
    assert not tier_b.contains(key) and tier_b.get(key) is None
    assert tier_b.put(key, rec_b).stored
    assert torch.equal(tier_a.get(key).tensor(), block)
    assert torch.equal(tier_b.get(key).tensor(), block * 2)
    assert list(tier_a) == [key] and list(tier_b) == [key]
    assert tier_b.remove(key) and tier_a.contains(key)


def test_bad_input_raises(factory: Factory) -> None:
    tier = factory(NS_A)
    rec_a, rec_a2 = records(NS_A, 2)
    with pytest.raises(ValueError, match="namespace"):
        tier.put(rec_a.block_hash, records(NS_B, 1)[0])
    with pytest.raises(ValueError, match="not key"):
        tier.put(rec_a2.block_hash, rec_a)
    with pytest.raises(ValueError, match="32 bytes"):
        tier.get(b"short")
    with pytest.raises(TypeError, match="BlockRecord"):
        tier.put(rec_a.block_hash, rec_a.to_bytes())  # type: ignore[arg-type]
    assert tier.usage().counters.get("puts", 0) == 0


def test_usage_reports_capacity_and_health(factory: Factory) -> None:
    tier = factory(NS_A)
    recs = records(NS_A, 2)
    tier.put_many([(r.block_hash, r) for r in recs])
    usage = tier.usage()
    assert usage.healthy and not usage.read_only and usage.last_error == ""
    if isinstance(tier, TieredStore):
        assert [c.name for c in usage.children] == ["cpu", "disk"]
        assert usage.used_bytes == sum(c.used_bytes for c in usage.children)
        assert usage.capacity_bytes == 600 + (1 << 20)
    elif usage.used_bytes is not None:
        assert usage.used_bytes == sum(r.nbytes for r in recs) and usage.num_blocks == 2
        assert usage.capacity_bytes == 1 << 20
    else:  # Redis: capacity is the server's business
        assert usage.capacity_bytes is None and usage.num_blocks is None


def test_get_into_fills_the_callers_tensors(factory: Factory) -> None:
    tier = factory(NS_A)
    recs = records(NS_A, 3)
    tier.put_many([(r.block_hash, r) for r in recs])
    absent = records(NS_A, 1, b"absent")[0].block_hash
    outs = [torch.zeros(2, 4, 8, dtype=torch.bfloat16) for _ in range(4)]
    keys = [recs[2].block_hash, absent, recs[0].block_hash, recs[1].block_hash]
    assert tier.get_many_into(keys, outs) == [True, False, True, True]
    assert [float(o[0, 0, 0]) for o in outs] == [2.0, 0.0, 0.0, 1.0]
    assert all(torch.equal(o, recs[i].tensor()) for o, i in ((outs[0], 2), (outs[2], 0), (outs[3], 1)))
    strided = torch.zeros(8, 4, 2, dtype=torch.bfloat16).permute(2, 1, 0)  # not contiguous: still filled
    assert tier.get_into(recs[1].block_hash, strided) and torch.equal(strided, recs[1].tensor())
    assert tier.get_many_into([], []) == []
    with pytest.raises(ValueError, match=r"out is torch.bfloat16 \(4, 8\)"):
        tier.get_into(recs[0].block_hash, torch.zeros(4, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out is torch.float32"):
        tier.get_into(recs[0].block_hash, torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="out is torch.complex64"):
        tier.get_into(recs[0].block_hash, torch.zeros(2, 4, 8, dtype=torch.complex64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tier.get_into(recs[0].block_hash, bytearray(64))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 keys for 1 output tensors"):
        tier.get_many_into(keys[:2], outs[:1])
    if not isinstance(tier, TieredStore):  # a block found but not of out's shape still counts as found
        assert (tier.usage().counters["hits"], tier.usage().counters["misses"]) == (7, 1)


def test_a_borrowed_block_is_stored_as_it_was_at_put(factory: Factory) -> None:
    tier = factory(NS_A)
    block = torch.full((2, 4, 8), 3.0, dtype=torch.bfloat16)
    key = hashlib.sha256(b"borrowed").digest()
    record = borrow_block(key, NS_A, block)
    assert record.borrowed and bytes(record.payload) == block.view(torch.uint8).numpy().tobytes()
    assert tier.put(key, record).stored
    block.fill_(-1.0)  # the caller reuses its tensor as soon as put has returned
    assert torch.equal(tier.get(key).tensor(), torch.full((2, 4, 8), 3.0, dtype=torch.bfloat16))


def test_registry_builds_tiers_and_names_the_valid_ones(tmp_path: Path) -> None:
    assert isinstance(make_tier("cpu", NS_A, capacity_bytes=100, pin_memory=False), CPUTier)
    assert isinstance(make_tier("disk", NS_A, root=tmp_path, capacity_bytes=100), DiskTier)
    assert isinstance(make_tier("disk", NS_A, root=tmp_path, capacity_bytes=100, layout="files"), DiskTier)
    assert isinstance(make_tier("disk", NS_A, root=tmp_path, capacity_bytes=100, layout="segments"), SegmentDiskTier)
    with pytest.raises(ValueError, match="expected one of: files, segments"):
        make_tier("disk", NS_A, root=tmp_path, capacity_bytes=100, layout="tape")
    with pytest.raises(ValueError, match="disk tier only"):
        make_tier("cpu", NS_A, capacity_bytes=100, layout="segments")
    with pytest.raises(ValueError, match="cpu, disk, redis"):
        make_tier("tape", NS_A)


def test_cluster_spreads_blocks_over_nodes(redis_cluster: list[RedisServer]) -> None:
    tier = RedisTier(NS_A, redis_cluster[0].url + "?cluster=1", prefix="spread:")
    codec = make_codec("identity")
    blocks = [encode_block(hashlib.sha256(b"c" + bytes([i])).digest(), NS_A, torch.full((2,), float(i)), codec)
              for i in range(30)]
    assert all(r.stored for r in tier.put_many([(b.block_hash, b) for b in blocks]))
    per_node = [len(redis.Redis(host="127.0.0.1", port=s.port).keys(b"spread:*")) for s in redis_cluster]
    assert sum(per_node) == 30 and sum(n > 0 for n in per_node) >= 2
    got = tier.get_many([b.block_hash for b in blocks])
    assert [g.to_bytes() for g in got] == [b.to_bytes() for b in blocks]
    assert sorted(tier) == sorted(b.block_hash for b in blocks)
