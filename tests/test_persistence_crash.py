"""kill -9 in the middle of persisting, many times at random moments: what was acknowledged survives whole.

A forked child (a real process: the parent already has torch loaded, so fork costs milliseconds where a fresh
interpreter would cost seconds) opens a DiskTier on a shared folder and writes blocks without end, printing
each key on its stdout pipe right after `put` returned. The parent SIGKILLs it after a random delay, then a
fresh DiskTier scans the folder: every printed key must be served and equal to what was written, and every
block it serves must be one the child really wrote (nothing torn, nothing corrupt). The folder is shared across
rounds, so each scan also meets the temporary files and half-written state of the previous kill (rounds
already checked are removed, to keep every scan small).
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ultra_adaptive_kv_cache_engine.compression import EncodedTensor, TensorMeta
from ultra_adaptive_kv_cache_engine.tiers import DiskTier, SegmentDiskTier, Tier, seal
from ultra_adaptive_kv_cache_engine.types import CodecKind, FsyncPolicy

NS = hashlib.sha256(b"crash-tests").digest()
ROUNDS = int(os.environ.get("CRASH_ROUNDS", "50"))
PAYLOAD = 4096
META = TensorMeta(CodecKind.IDENTITY, "uint8", (PAYLOAD,), {})
Opener = Callable[..., Tier]
LAYOUTS: dict[str, Opener] = {
    "files": DiskTier,
    # small segments: the kills land on segment changes too, and the parent's removals compact
    "segments": lambda ns, root, cap, **kw: SegmentDiskTier(ns, root, cap, segment_bytes=64 << 10, **kw),
}


def key_of(round_: int, i: int) -> bytes:
    return hashlib.sha256(f"{round_}:{i}".encode()).digest()


def payload_of(key: bytes) -> bytes:
    return (key * (PAYLOAD // len(key) + 1))[:PAYLOAD]


def _child(open_tier: Opener, root: Path, round_: int, fsync: FsyncPolicy, out_fd: int) -> None:
    """Runs in the forked child: no torch, only the tier and hashlib; never returns."""
    try:
        tier = open_tier(NS, root, 1 << 40, fsync=fsync)
        os.write(out_fd, b"ready\n")
        i = 0
        while True:
            key = key_of(round_, i)
            if tier.put(key, seal(key, NS, EncodedTensor(META, payload_of(key)))).stored:
                os.write(out_fd, f"{i}\n".encode())
            if fsync is FsyncPolicy.BATCH and i % 8 == 7:
                tier.flush()
            i += 1
    finally:
        os._exit(1)


def _read_lines(fd: int, deadline: float, buffer: bytearray) -> bool:
    """Read what `fd` has until `deadline`; False at EOF."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            return True
        chunk = os.read(fd, 65536)
        if not chunk:
            return False
        buffer.extend(chunk)


def _one_round(open_tier: Opener, root: Path, round_: int, rng: random.Random) -> tuple[list[int], int]:
    """Fork a writer, kill it at a random moment; return the acknowledged indices and the kill status."""
    fsync = [FsyncPolicy.ALWAYS, FsyncPolicy.BATCH, FsyncPolicy.NEVER][round_ % 3]
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        _child(open_tier, root, round_, fsync, write_fd)
    os.close(write_fd)
    buffer = bytearray()
    try:
        deadline = time.monotonic() + 20.0
        while not buffer.startswith(b"ready\n"):
            assert _read_lines(read_fd, min(deadline, time.monotonic() + 0.05), buffer) or buffer, "child died early"
            assert time.monotonic() < deadline, "child did not start"
        _read_lines(read_fd, time.monotonic() + rng.uniform(0.001, 0.015), buffer)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        while _read_lines(read_fd, time.monotonic() + 5.0, buffer):
            pass
    finally:
        os.close(read_fd)
    lines = bytes(buffer).decode().split("\n")
    assert lines[0] == "ready"
    complete = lines[1:-1]  # the last piece may be a line cut by the kill
    return [int(x) for x in complete], status


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_kill_minus_nine_while_persisting_never_loses_or_tears_an_acknowledged_block(tmp_path: Path,
                                                                                     layout: str) -> None:
    open_tier = LAYOUTS[layout]
    rng = random.Random(20240611)
    written: dict[bytes, bytes] = {}
    interrupted = 0
    for round_ in range(ROUNDS):
        acked, status = _one_round(open_tier, tmp_path, round_, rng)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        last = max(acked, default=-1)
        for i in range(last + 2):  # the child may have written one block past its last acknowledgement
            written[key_of(round_, i)] = payload_of(key_of(round_, i))
        interrupted += bool(acked)
        tier = open_tier(NS, tmp_path, 1 << 40)
        for i in acked:
            record = tier.get(key_of(round_, i))
            assert record is not None, f"round {round_}: acknowledged block {i} is gone"
            assert bytes(record.payload) == payload_of(key_of(round_, i))
        this_round = {key_of(round_, i) for i in range(last + 2)}
        for key in tier:
            assert key in written, f"round {round_}: a block nobody wrote is served"
            if key in this_round:  # whole and equal (earlier rounds were checked in theirs)
                record = tier.get(key)
                assert record is not None and bytes(record.payload) == written[key]
        counters = tier.usage().counters
        assert counters["corrupt_dropped"] == counters["namespace_dropped"] == 0
        assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
        for key in [k for k in tier if k not in this_round]:  # keep the scans small: drop checked rounds
            tier.remove(key)
            del written[key]
    assert interrupted >= 1  # the kills did land while blocks were being acknowledged
    final = open_tier(NS, tmp_path, 1 << 40, verify_on_scan=True)
    assert final.usage().counters["corrupt_dropped"] == 0
    assert {k: bytes(final.get(k).payload) for k in final} == {k: written[k] for k in final}
