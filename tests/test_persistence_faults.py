"""Persistence faults with real files and real processes: flipped bytes, torn files, a full disk."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import (
    CPUTier,
    DiskTier,
    SegmentDiskTier,
    Tier,
    TieredStore,
    encode_block,
)
from ultra_adaptive_kv_cache_engine.tiers.record import CHECKSUM_BYTES, PREFIX_BYTES

NS = hashlib.sha256(b"fault-tests").digest()


def recs(n: int, elements: int = 32, salt: bytes = b"f"):
    codec = make_codec("identity")
    return [encode_block(hashlib.sha256(salt + bytes([i])).digest(), NS,
                         torch.arange(elements, dtype=torch.float32) + i, codec) for i in range(n)]


R = recs(4)
K = [r.block_hash for r in R]
SIZE = R[0].nbytes


LAYOUTS = {"files": DiskTier, "segments": SegmentDiskTier}


def path_of(root: Path, key: bytes) -> Path:
    return root / NS.hex() / key.hex()[:2] / (key.hex() + ".blk")


def locate(root: Path, key: bytes) -> tuple[Path, int]:
    """The file holding `key`'s record and where the record starts in it (either layout)."""
    path = path_of(root, key)
    if path.exists():
        return path, 0
    for seg in sorted((root / NS.hex() / "segments").glob("*.seg")):
        at = seg.read_bytes().find(key)
        if at >= 16:
            return seg, at - 16
    raise AssertionError("record not found")


@pytest.mark.parametrize(
    "position", [3, 20, 60, PREFIX_BYTES + 2, SIZE - CHECKSUM_BYTES - 5, SIZE - 1],
    ids=["magic", "hash", "namespace", "json", "payload", "checksum"],
)  # fmt: skip
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_flipped_byte_is_detected_dropped_and_counted(tmp_path: Path, position: int, layout: str) -> None:
    tier: Tier = LAYOUTS[layout](NS, tmp_path, 10 * SIZE)
    tier.put_many([(r.block_hash, r) for r in R[:2]])
    path, start = locate(tmp_path, K[1])
    data = bytearray(path.read_bytes())
    data[start + position] ^= 0x40
    path.write_bytes(bytes(data))
    assert tier.get(K[1]) is None
    counters = tier.usage().counters
    assert (counters["corrupt_dropped"], counters["misses"], counters["hits"]) == (1, 1, 0)
    assert not tier.contains(K[1]) and tier.usage().used_bytes == SIZE
    assert not path.exists() if layout == "files" else sorted(LAYOUTS[layout](NS, tmp_path, 10 * SIZE)) == [K[0]]
    assert torch.equal(tier.get(K[0]).tensor(), R[0].tensor())  # the neighbour is untouched


def test_a_torn_file_is_never_served_after_restart(tmp_path: Path) -> None:
    DiskTier(NS, tmp_path, 10 * SIZE).put_many([(r.block_hash, r) for r in R])
    for key, keep in ((K[1], SIZE // 2), (K[2], 10), (K[3], 0)):
        path = path_of(tmp_path, key)
        path.write_bytes(path.read_bytes()[:keep])
    tier = DiskTier(NS, tmp_path, 10 * SIZE)
    assert list(tier) == [K[0]] and tier.usage().counters["corrupt_dropped"] == 3


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_persist_then_load_through_a_store(tmp_path: Path, layout: str) -> None:
    def store() -> TieredStore:
        return TieredStore([CPUTier(NS, 10 * SIZE, pin_memory=False), LAYOUTS[layout](NS, tmp_path, 10 * SIZE)])

    first = store()
    first.put_many([(r.block_hash, r) for r in R])
    assert sorted(first.flush().keys) == sorted(K)
    second = store()
    assert [torch.equal(second.get(k).tensor(), r.tensor()) for k, r in zip(K, R, strict=True)] == [True] * 4
    assert second.tiers[1].usage().counters["hits"] == 4 and len(second.tiers[0]) == 4


def _full_disk_child(layout: str, root: Path, out_fd: int, small: list, big) -> None:
    """In a forked child (no torch work here): a file-size limit makes big writes fail with EFBIG."""
    report: dict[str, object] = {}
    try:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 * SIZE, resource.RLIM_INFINITY))
        now = [0.0]
        tier = LAYOUTS[layout](NS, root, 1 << 30, readonly_retry_s=30.0, clock=lambda: now[0])
        report["small_stored"] = tier.put(K[0], small[0]).stored
        result = tier.put(big.block_hash, big)
        report["big"] = [result.stored, result.reason]
        usage = tier.usage()
        report["usage"] = [usage.read_only, usage.healthy, usage.last_error, dict(usage.counters)]
        refused = tier.put(K[1], small[1])
        report["refused"] = [refused.stored, refused.reason]
        report["served"] = bytes(tier.get(K[0]).payload) == bytes(small[0].payload)
        now[0] = 31.0  # after the retry interval, writes are tried again
        report["retried"] = tier.put(K[2], small[2]).stored
        report["writable_again"] = not tier.usage().read_only
    except BaseException as exc:  # report, never raise into the forked pytest
        report["crash"] = repr(exc)
    finally:
        os.write(out_fd, json.dumps(report).encode())
        os._exit(0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_full_disk_is_a_clear_error_and_the_tier_stays_readable(tmp_path: Path, layout: str) -> None:
    small, big = recs(3), recs(1, elements=4096, salt=b"big")[0]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _full_disk_child(layout, tmp_path, write_fd, small, big)
    os.close(write_fd)
    chunks = []
    while chunk := os.read(read_fd, 65536):
        chunks.append(chunk)
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    report = json.loads(b"".join(chunks))
    assert "crash" not in report, report.get("crash")
    assert report["small_stored"] is True
    stored, reason = report["big"]
    assert stored is False and "disk full (EFBIG)" in reason
    read_only, healthy, last_error, counters = report["usage"]
    assert read_only is True and healthy is False and "disk full" in last_error
    assert (counters["disk_full"], counters["errors"], counters["puts"]) == (1, 1, 1)
    refused_stored, refused_reason = report["refused"]
    assert refused_stored is False and refused_reason.startswith("read-only after: disk full")
    assert report["served"] is True and report["retried"] is True and report["writable_again"] is True
    after = LAYOUTS[layout](NS, tmp_path, 1 << 30)  # nothing half-written was left behind
    assert sorted(after) == sorted([K[0], K[2]]) and after.usage().counters["corrupt_dropped"] == 0
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def _segment(root: Path) -> Path:
    (seg,) = sorted((root / NS.hex() / "segments").glob("*.seg"))
    return seg


def test_a_torn_tail_of_the_last_segment_is_cut_and_bad_bytes_inside_are_skipped(tmp_path: Path) -> None:
    SegmentDiskTier(NS, tmp_path, 10 * SIZE).put_many([(r.block_hash, r) for r in R])
    seg = _segment(tmp_path)
    data = bytearray(seg.read_bytes())
    starts = [data.find(k) - 16 for k in K]
    data[starts[1]] ^= 0xFF  # record 1's magic: a bad region in the middle
    seg.write_bytes(bytes(data[: starts[3] + SIZE // 2]))  # record 3 torn by a crash
    tier = SegmentDiskTier(NS, tmp_path, 10 * SIZE)
    assert sorted(tier) == sorted([K[0], K[2]])
    counters = tier.usage().counters
    assert (counters["corrupt_dropped"], counters["tail_truncated"]) == (1, 1)
    assert seg.stat().st_size == starts[3]  # the torn tail is gone; appends go on after record 2
    assert tier.put(K[3], R[3]).stored and torch.equal(tier.get(K[3]).tensor(), R[3].tensor())
    assert sorted(SegmentDiskTier(NS, tmp_path, 10 * SIZE)) == sorted([K[0], K[2], K[3]])
