"""SegmentDiskTier's log in tiny worlds: exact segments, dead bytes, compaction, and a compaction cut short."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import SegmentDiskTier, encode_block
from ultra_adaptive_kv_cache_engine.tiers.segment_files import TOMBSTONE_BYTES, padded

NS = hashlib.sha256(b"segment-tests").digest()
CODEC = make_codec("identity")
R = [encode_block(hashlib.sha256(b"s" + bytes([i])).digest(), NS, torch.full((16,), float(i)), CODEC)
     for i in range(8)]  # fmt: skip
K = [r.block_hash for r in R]
SLOT = padded(R[0].nbytes)  # 320 bytes per record in a segment


def tier(root: Path) -> SegmentDiskTier:
    return SegmentDiskTier(NS, root, 1 << 20, segment_bytes=4 * SLOT)


def test_appends_fill_segments_in_order(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put_many([(r.block_hash, r) for r in R[:6]])
    assert (SLOT, TOMBSTONE_BYTES) == (320, 128)
    assert t.stats.ids == (1, 2) and t.stats.sizes == (4 * SLOT, 2 * SLOT) and t.stats.dead == (0, 0)
    assert t.usage().used_bytes == 6 * R[0].nbytes


def test_removal_marks_dead_bytes_and_compacts_a_half_dead_segment(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put_many([(r.block_hash, r) for r in R[:6]])
    t.remove(K[0])  # segment 1: one record dead, its tombstone lands in segment 2 (needed: not dead)
    assert t.stats.sizes == (4 * SLOT, 2 * SLOT + TOMBSTONE_BYTES) and t.stats.dead == (SLOT, 0)
    t.remove(K[1])  # segment 1 is half dead: K2, K3 move to the active segment, segment 1 goes
    stats = t.stats
    assert stats.ids == (2, 3) and stats.active == 3
    assert stats.sizes == (2 * SLOT + 2 * TOMBSTONE_BYTES + SLOT, SLOT)
    assert stats.dead == (2 * TOMBSTONE_BYTES, 0)  # both tombstones shadowed records of segment 1 only
    counters = t.usage().counters
    assert (counters["compactions"], counters["compacted_bytes"]) == (1, 2 * R[0].nbytes)
    assert sorted(t) == sorted(K[2:6])
    again = tier(tmp_path)
    assert sorted(again) == sorted(K[2:6]) and again.stats == stats
    assert all(torch.equal(again.get(k).tensor(), R[i].tensor()) for i, k in enumerate(K) if 2 <= i < 6)


def test_a_compaction_cut_before_the_delete_keeps_every_block_once(tmp_path: Path) -> None:
    t = tier(tmp_path)
    t.put_many([(r.block_hash, r) for r in R[:6]])
    seg1 = tmp_path / NS.hex() / "segments" / f"{1:016x}.seg"
    saved = seg1.read_bytes()
    t.remove(K[0])
    t.remove(K[1])  # compacts segment 1 ...
    assert not seg1.exists()
    del t
    seg1.write_bytes(saved)  # ... as if the process died after the copies were durable, before the unlink
    again = tier(tmp_path)
    assert sorted(again) == sorted(K[2:6])
    counters = again.usage().counters
    assert counters["duplicates_dropped"] == 2 and counters["corrupt_dropped"] == 0
    assert all(torch.equal(again.get(k).tensor(), R[i].tensor()) for i, k in enumerate(K) if 2 <= i < 6)
    assert again.get(K[0]) is None and again.get(K[1]) is None  # their tombstones still hold


def test_eviction_appends_tombstones_and_survives_restart(tmp_path: Path) -> None:
    t = SegmentDiskTier(NS, tmp_path, 3 * R[0].nbytes, segment_bytes=4 * SLOT)
    results = t.put_many([(r.block_hash, r) for r in R[:5]])
    assert [len(res.evicted) for res in results] == [0, 0, 0, 1, 1]
    assert sorted(t) == sorted(K[2:5]) and t.usage().counters["evictions"] == 2
    assert sorted(SegmentDiskTier(NS, tmp_path, 3 * R[0].nbytes, segment_bytes=4 * SLOT)) == sorted(K[2:5])
    shutil.rmtree(tmp_path / NS.hex())
    assert list(tier(tmp_path)) == []
