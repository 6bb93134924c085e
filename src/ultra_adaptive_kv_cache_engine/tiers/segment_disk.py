"""`SegmentDiskTier`: the disk tier as an append-only log of segment files, rebuilt by a walk at start.

Blocks are appended (one `pwritev`: record header, payload, checksum, padding) to the active segment under
`<root>/<namespace hex>/segments/` (`segment_files.py`); a new segment starts when the active one would pass
`segment_bytes`. Reads are one `preadv` from a descriptor kept open, straight into the caller's tensor for
`get_into`. The index (key -> segment, offset, length) lives in memory and is rebuilt at start by walking every
segment from its start: newest record of a key wins, a tombstone removes the older ones, bad regions of a
segment are skipped and counted (`corrupt_dropped`), and a torn tail of the LAST segment (a crash during an
append) is cut off (`tail_truncated`, not corruption: nothing acknowledged is lost).

Durability follows `FsyncPolicy`: ALWAYS fsyncs the segment before `put` returns; BATCH at `flush()`; NEVER
leaves it to the OS. Removal and eviction append a tombstone and count the record's bytes as dead. When dead
bytes reach `compact_dead_ratio` of a sealed segment, that segment is compacted (most dead first): its
live records (verified) and still-needed tombstones are copied to the active segment, the copies fsynced
(unless NEVER), and only then the old segment deleted, so a crash in between leaves duplicates (the newest
wins), never a loss. A full disk makes the tier read-only for `readonly_retry_s`, as `DiskTier` (both from
`DiskTierBase`).

Invariants: the index holds exactly the keys whose records were appended whole (or found by the walk);
`used_bytes` == sum of their record sizes <= `capacity_bytes`; the policy tracks exactly the indexed keys; each
segment's `dead` == its size minus the padded sizes of the indexed records in it.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import torch

from ..compression.codec import writable_bytes
from ..policies.base import Clock
from ..types import FsyncPolicy, TierKind
from . import disk_files
from . import segment_files as seg_io
from . import segment_log as log_maintenance
from .base import FlushResult, PutResult, require_tensor
from .disk_common import DiskTierBase
from .record import BlockRecord, RecordError, check_key, parse_record, record_head
from .segment_files import Segment, padded

Loc = tuple[int, int, int]
"""(segment id, offset, record length) of an indexed block."""
MIN_SEGMENT = 1 << 20
MAX_SEGMENT = 256 << 20


@dataclass(frozen=True)
class SegmentStats:
    """The log now: segment ids oldest first, their sizes and dead bytes (padded), and the active id."""

    ids: tuple[int, ...]
    sizes: tuple[int, ...]
    dead: tuple[int, ...]
    active: int


class SegmentDiskTier(DiskTierBase[Loc]):
    """Blocks appended to segment files under `<root>/<namespace hex>/segments/`, bounded by `capacity_bytes`
    (live record bytes), evicting by `policy`. `segment_bytes` defaults to capacity / 8 within [1, 256] MiB."""

    kind = TierKind.DISK
    durable = True
    folder: str

    def __init__(
        self,
        namespace: bytes,
        root: str | os.PathLike[str],
        capacity_bytes: int,
        policy: str = "lru",
        fsync: FsyncPolicy | str = FsyncPolicy.BATCH,
        verify_on_scan: bool = False,
        readonly_retry_s: float = 30.0,
        io_threads: int | None = None,
        demote_evicted: bool = True,
        segment_bytes: int | None = None,
        compact_dead_ratio: float = 0.5,
        clock: Clock | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(namespace, capacity_bytes, policy, fsync, readonly_retry_s, io_threads, demote_evicted, clock,
                         name)
        if segment_bytes is None:
            segment_bytes = min(MAX_SEGMENT, max(MIN_SEGMENT, self.capacity_bytes // 8))
        if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int) or segment_bytes < seg_io.ALIGN:
            raise ValueError(f"segment_bytes={segment_bytes!r} must be an integer >= {seg_io.ALIGN}")
        if not 0.0 < float(compact_dead_ratio) < 1.0:
            raise ValueError(f"compact_dead_ratio={compact_dead_ratio!r} must be in (0, 1)")
        self.segment_bytes = segment_bytes
        self.compact_dead_ratio = float(compact_dead_ratio)
        self.folder = os.path.join(os.fspath(root), namespace.hex(), "segments")
        self._segments: dict[int, Segment] = {}
        self._tomb_at: dict[bytes, int] = {}
        self._active: Segment
        self._unsynced_segments: set[int] = set()
        self._lock = threading.RLock()  # re-entered: compaction and the start-up walk call back into the tier
        with self._lock:
            self._open(verify_on_scan)

    # -- the six methods -------------------------------------------------------------------------------------

    def get(self, key: bytes) -> BlockRecord | None:
        check_key(key)
        found = self._acquire(key)
        if found is None:
            self.counters.add("misses")
            return None
        seg, loc = found
        try:
            record = parse_record(seg_io.read_exact(seg.fd, loc[1], loc[2]), key, self.namespace)
        except RecordError as exc:
            self._release(seg, None, 0)
            self._drop_bad(key, loc, exc)
            self.counters.add("misses")
            return None
        except OSError as exc:
            self._release(seg, None, 0)
            self._error(f"read of block {key.hex()[:16]} failed: {exc}")
            self.counters.add("misses")
            return None
        self._release(seg, key, loc[2])
        return record

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """`get` into `out`: an identity payload is read with one `preadv` straight into a contiguous CPU `out`
        and verified there; anything else, or any doubt, goes the way of `get` + decode (which counts and drops
        what is bad)."""
        check_key(key)
        view = writable_bytes(require_tensor(out))
        header = self._raw_header(out) if view is not None else None
        if view is None or header is None:
            return super().get_into(key, out)
        found = self._acquire(key)
        if found is None:
            self.counters.add("misses")
            return False
        seg, loc = found
        try:
            read = seg_io.read_record_into(seg.fd, loc[1], record_head(key, self.namespace, header, view.nbytes),
                                           view)
        except OSError:
            read = False
        self._release(seg, key if read else None, loc[2])
        return read or super().get_into(key, out)

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        refused = self._precheck(key, record)
        if refused is not None:
            return refused
        size = record.nbytes
        with self._lock:
            done = self._admit(key, size)
            if done is not None:
                return done
            evicted = self._make_room(size)
            try:
                seg_id, offset = self._append(record.chunks(), self.fsync is FsyncPolicy.ALWAYS)
            except OSError as exc:
                return PutResult(False, evicted, self._write_failed(key, exc))
            self._insert(key, (seg_id, offset, size))
            self._unsynced.append((key, size))
            recovered = self._writable_again()
            self._maybe_compact()
        self._count_put(size, recovered)
        return PutResult(True, evicted)

    def remove(self, key: bytes) -> bool:
        check_key(key)
        with self._lock:
            if key not in self._index:
                return False
            self._drop(key)
            self._maybe_compact()
        self.counters.add("removed")
        return True

    def resize(self, capacity_bytes: int) -> tuple[BlockRecord, ...]:
        """`DiskTierBase.resize`, then compaction of the segments its evictions left dead enough."""
        with self._lock:
            evicted = super().resize(capacity_bytes)
            self._maybe_compact()
        return evicted

    def flush(self) -> FlushResult:
        """fsync (BATCH) the segments appended to since the last flush; return the blocks written since then."""
        with self._lock:
            live = self._take_unsynced()
            if self.fsync is FsyncPolicy.BATCH:
                self._sync_segments()
        return FlushResult(tuple(k for k, _ in live), tuple(s for _, s in live))

    # -- variants and views ------------------------------------------------------------------------------------

    @property
    def stats(self) -> SegmentStats:
        with self._lock:
            segs = list(self._segments.values())
            return SegmentStats(tuple(s.id for s in segs), tuple(s.size for s in segs), tuple(s.dead for s in segs),
                                self._active.id)

    def __del__(self) -> None:
        for seg in list(getattr(self, "_segments", {}).values()):
            seg.retired = True
            seg.readers = 0
            seg.close_if_done()

    # -- reads --------------------------------------------------------------------------------------------------

    def _acquire(self, key: bytes) -> tuple[Segment, Loc] | None:
        """The block's location with its segment pinned open (a reader), or None."""
        with self._lock:
            loc = self._index.get(key)
            if loc is None:
                return None
            seg = self._segments[loc[0]]
            seg.readers += 1
            return seg, loc

    def _release(self, seg: Segment, served: bytes | None, size: int) -> None:
        """Unpin `seg`; count a hit of `size` bytes if `served` (a key) was read whole."""
        with self._lock:
            seg.readers -= 1
            seg.close_if_done()
            if served is not None and served in self._index:
                self._policy.on_access(served)
        if served is not None:
            self._count_hit(size)

    # -- writes (lock held) -------------------------------------------------------------------------------------

    def _append(self, chunks: tuple[bytes | memoryview, ...] | list[bytes], sync: bool) -> tuple[int, int]:
        """Append one record to the active segment (a new one first if it would pass `segment_bytes`)."""
        length = sum(memoryview(c).nbytes for c in chunks)
        if self._active.size and self._active.size + padded(length) > self.segment_bytes:
            self._new_segment()
        seg = self._active
        offset = seg_io.append(seg, chunks)
        if sync:
            os.fsync(seg.fd)
        else:
            self._unsynced_segments.add(seg.id)
        return seg.id, offset

    def _new_segment(self) -> None:
        seg_id = self._active.id + 1 if self._segments else 1
        seg = seg_io.open_segment(self.folder, seg_id, create=True)
        self._segments[seg_id] = seg
        self._active = seg
        if self.fsync is not FsyncPolicy.NEVER:
            disk_files.fsync_dir(self.folder)

    def _insert(self, key: bytes, loc: Loc) -> None:
        self._index[key] = loc
        self._segments[loc[0]].keys.add(key)
        self._used += loc[2]
        self._policy.on_insert(key, loc[2])
        self.retire_tombstone(key)  # the new record supersedes it

    def retire_tombstone(self, key: bytes) -> None:
        """`key`'s tombstone is no longer needed: count it dead."""
        seg_id = self._tomb_at.pop(key, None)
        seg = self._segments.get(seg_id) if seg_id is not None else None
        if seg is not None and key in seg.tombstones:
            seg.tombstones.discard(key)
            seg.dead += seg_io.TOMBSTONE_BYTES

    def _drop(self, key: bytes) -> None:
        """Unindex `key`, count its bytes dead and append its tombstone (a failed tombstone is an error: the
        block would come back after a restart, whole and verified)."""
        seg_id, _, length = self._index.pop(key)
        seg = self._segments[seg_id]
        seg.keys.discard(key)
        seg.dead_keys.add(key)
        seg.dead += padded(length)
        self._used -= length
        self._policy.on_remove(key)
        self._append_tombstone(key)

    def _append_tombstone(self, key: bytes) -> None:
        try:
            self.write_tombstone(key, sync=self.fsync is FsyncPolicy.ALWAYS)
        except OSError as exc:
            self._error(f"tombstone of block {key.hex()[:16]} failed: {exc}")

    def write_tombstone(self, key: bytes, sync: bool) -> None:
        """Append `key`'s tombstone (needed: not dead); OSError if the append fails (lock held)."""
        seg_id, _ = self._append([seg_io.tombstone(key, self.namespace)], sync)
        self._segments[seg_id].tombstones.add(key)
        self._tomb_at[key] = seg_id

    def _read_victim(self, key: bytes) -> BlockRecord:
        seg_id, offset, length = self._index[key]
        return parse_record(seg_io.read_exact(self._segments[seg_id].fd, offset, length), key, self.namespace)

    def _sync_segments(self) -> None:
        try:
            for seg_id in sorted(self._unsynced_segments):
                seg = self._segments.get(seg_id)
                if seg is not None:
                    os.fsync(seg.fd)
            self._unsynced_segments.clear()
        except OSError as exc:
            self._error(f"fsync failed: {exc}")

    def _open(self, verify: bool) -> None:
        log_maintenance.open_log(self, verify)

    def _maybe_compact(self) -> None:
        log_maintenance.maybe_compact(self)

    # -- faults -------------------------------------------------------------------------------------------------

    def _drop_bad(self, key: bytes, loc: Loc, exc: RecordError) -> None:
        self._report_bad(key, exc)
        with self._lock:
            if self._index.get(key) == loc:
                self._drop(key)
                try:  # wipe its magic: a bad name byte must not list the record under another key at start
                    os.pwrite(self._segments[loc[0]].fd, bytes(8), loc[1])
                except OSError:
                    pass
