"""DiskTier: file layout, fsync policies, warm-start scan (order, capacity, leftovers, foreign files)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import DiskTier, encode_block
from ultra_adaptive_kv_cache_engine.types import FsyncPolicy

NS = hashlib.sha256(b"disk-tests").digest()
OTHER = hashlib.sha256(b"other-tenant").digest()


def recs(n: int, namespace: bytes = NS):
    codec = make_codec("identity")
    return [encode_block(hashlib.sha256(bytes([i])).digest(), namespace, torch.full((4, 8), float(i)), codec)
            for i in range(n)]


R = recs(6)
K = [r.block_hash for r in R]
SIZE = R[0].nbytes


def path_of(root: Path, key: bytes, namespace: bytes = NS) -> Path:
    return root / namespace.hex() / key.hex()[:2] / (key.hex() + ".blk")


def age(root: Path, keys: list[bytes]) -> None:
    """Give files strictly increasing mtimes in the order of `keys` (oldest first)."""
    for i, key in enumerate(keys):
        os.utime(path_of(root, key), ns=(1_000_000_000 * (i + 1), 1_000_000_000 * (i + 1)))


@pytest.mark.parametrize("fsync", list(FsyncPolicy))
def test_one_file_per_block_sharded_by_hash_prefix(tmp_path: Path, fsync: FsyncPolicy) -> None:
    tier = DiskTier(NS, tmp_path, 10 * SIZE, fsync=fsync)
    for r in R[:3]:
        assert tier.put(r.block_hash, r).stored
    for r in R[:3]:
        assert path_of(tmp_path, r.block_hash).read_bytes() == r.to_bytes()
    flushed = tier.flush()
    assert sorted(flushed.keys) == sorted(K[:3]) and flushed.nbytes == 3 * SIZE
    assert tier.flush().keys == ()
    assert not [p for p in (tmp_path / NS.hex()).rglob("*") if ".tmp-" in p.name]


def test_warm_start_rebuilds_index_in_age_order(tmp_path: Path) -> None:
    first = DiskTier(NS, tmp_path, 10 * SIZE)
    for r in R[:3]:
        first.put(r.block_hash, r)
    age(tmp_path, [K[2], K[0], K[1]])
    second = DiskTier(NS, tmp_path, 3 * SIZE)
    assert sorted(second) == sorted(K[:3]) and second.usage().counters["scanned"] == 3
    assert second.usage().used_bytes == 3 * SIZE
    result = second.put(K[3], R[3])  # the oldest file (K2) is evicted first
    assert [e.block_hash for e in result.evicted] == [K[2]]
    assert not path_of(tmp_path, K[2]).exists()
    assert torch.equal(second.get(K[0]).tensor(), R[0].tensor())


def test_eviction_without_demotion_only_deletes(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 2 * SIZE, demote_evicted=False)
    for r in R[:2]:
        tier.put(r.block_hash, r)
    result = tier.put(K[2], R[2])
    assert result.stored and result.evicted == () and sorted(tier) == sorted(K[1:3])
    assert not path_of(tmp_path, K[0]).exists() and tier.usage().counters["evictions"] == 1


def test_a_smaller_capacity_at_start_drops_the_oldest(tmp_path: Path) -> None:
    first = DiskTier(NS, tmp_path, 10 * SIZE)
    for r in R[:4]:
        first.put(r.block_hash, r)
    age(tmp_path, K[:4])
    second = DiskTier(NS, tmp_path, 2 * SIZE)
    assert sorted(second) == sorted(K[2:4]) and second.usage().used_bytes == 2 * SIZE
    assert not path_of(tmp_path, K[0]).exists() and not path_of(tmp_path, K[1]).exists()


def test_scan_removes_leftovers_and_bad_files_but_not_strangers(tmp_path: Path) -> None:
    DiskTier(NS, tmp_path, 10 * SIZE).put(K[0], R[0])
    folder = path_of(tmp_path, K[0]).parent
    (folder / (K[0].hex() + ".blk.tmp-123-1-0")).write_bytes(R[0].to_bytes()[:50])  # a crash leftover
    foreign = recs(2, OTHER)[1]  # another tenant's block planted under our folder
    path_of(tmp_path, K[1]).parent.mkdir(parents=True, exist_ok=True)
    path_of(tmp_path, K[1]).write_bytes(foreign.to_bytes())
    path_of(tmp_path, K[2]).write_bytes(R[3].to_bytes())  # a sound block under the wrong name
    path_of(tmp_path, K[4]).write_bytes(R[4].to_bytes()[:-7])  # torn
    (tmp_path / NS.hex() / "README").write_text("not ours")
    tier = DiskTier(NS, tmp_path, 10 * SIZE)
    assert list(tier) == [K[0]]
    counters = tier.usage().counters
    assert (counters["temp_removed"], counters["namespace_dropped"], counters["corrupt_dropped"]) == (1, 1, 2)
    assert not path_of(tmp_path, K[1]).exists() and not path_of(tmp_path, K[2]).exists()
    assert (tmp_path / NS.hex() / "README").exists()


def test_verify_on_scan_catches_a_flipped_payload_at_start(tmp_path: Path) -> None:
    DiskTier(NS, tmp_path, 10 * SIZE).put_many([(r.block_hash, r) for r in R[:2]])
    data = bytearray(path_of(tmp_path, K[1]).read_bytes())
    data[-40] ^= 0xFF  # inside the payload: the prefix still looks fine
    path_of(tmp_path, K[1]).write_bytes(bytes(data))
    lazy = DiskTier(NS, tmp_path, 10 * SIZE)
    assert sorted(lazy) == sorted(K[:2])  # only the prefix was read
    strict = DiskTier(NS, tmp_path, 10 * SIZE, verify_on_scan=True)
    assert list(strict) == [K[0]] and strict.usage().counters["corrupt_dropped"] == 1


def test_a_file_deleted_behind_its_back_is_a_miss(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 10 * SIZE)
    tier.put(K[0], R[0])
    path_of(tmp_path, K[0]).unlink()
    assert tier.get(K[0]) is None and not tier.contains(K[0])
    assert tier.usage().used_bytes == 0


def test_namespaces_live_in_separate_folders(tmp_path: Path) -> None:
    a, b = DiskTier(NS, tmp_path, 10 * SIZE), DiskTier(OTHER, tmp_path, 10 * SIZE)
    a.put(K[0], R[0])
    other = recs(1, OTHER)[0]
    b.put(other.block_hash, other)
    assert path_of(tmp_path, K[0]).exists() and path_of(tmp_path, K[0], OTHER).exists()
    assert path_of(tmp_path, K[0]).read_bytes() != path_of(tmp_path, K[0], OTHER).read_bytes()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync"):
        DiskTier(NS, tmp_path, SIZE, fsync="sometimes")
    with pytest.raises(ValueError, match="capacity_bytes"):
        DiskTier(NS, tmp_path, -1)
    with pytest.raises(ValueError, match="namespace"):
        DiskTier(b"x" * 5, tmp_path, SIZE)
