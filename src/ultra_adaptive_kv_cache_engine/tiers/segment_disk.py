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
wins), never a loss. A full disk makes the tier read-only for `readonly_retry_s`, as `DiskTier`.

Invariants: the index holds exactly the keys whose records were appended whole (or found by the walk);
`used_bytes` == sum of their record sizes <= `capacity_bytes`; the policy tracks exactly the indexed keys; each
segment's `dead` == its size minus the padded sizes of the indexed records in it.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..compression.codec import writable_bytes
from ..policies import make_policy
from ..policies.base import Clock
from ..types import FsyncPolicy, TierKind, parse_enum
from . import disk_files
from . import segment_files as seg_io
from . import segment_log as log_maintenance
from .base import LOGGER, FlushResult, PutResult, Tier, TierUsage, key_out_pairs, require_tensor
from .cpu import _require_capacity
from .disk import FULL_DISK_ERRNOS, HEADER_MEMO
from .record import (
    BlockRecord,
    NamespaceMismatchError,
    RecordError,
    check_key,
    parse_record,
    raw_header,
    record_head,
)
from .segment_files import Segment, padded

T = TypeVar("T")
R = TypeVar("R")
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


class SegmentDiskTier(Tier):
    """Blocks appended to segment files under `<root>/<namespace hex>/segments/`, bounded by `capacity_bytes`
    (live record bytes), evicting by `policy`. `segment_bytes` defaults to capacity / 8 within [1, 256] MiB."""

    kind = TierKind.DISK
    durable = True

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
        super().__init__(namespace, name)
        self.capacity_bytes = _require_capacity(capacity_bytes)
        threads = io_threads if io_threads is not None else min(8, os.cpu_count() or 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"io_threads={io_threads!r} must be a positive integer or None")
        if segment_bytes is None:
            segment_bytes = min(MAX_SEGMENT, max(MIN_SEGMENT, self.capacity_bytes // 8))
        if isinstance(segment_bytes, bool) or not isinstance(segment_bytes, int) or segment_bytes < seg_io.ALIGN:
            raise ValueError(f"segment_bytes={segment_bytes!r} must be an integer >= {seg_io.ALIGN}")
        if not 0.0 < float(compact_dead_ratio) < 1.0:
            raise ValueError(f"compact_dead_ratio={compact_dead_ratio!r} must be in (0, 1)")
        self.io_threads = threads
        self.segment_bytes = segment_bytes
        self.compact_dead_ratio = float(compact_dead_ratio)
        self.demote_evicted = bool(demote_evicted)
        self.fsync = parse_enum(FsyncPolicy, "fsync", fsync)
        self.readonly_retry_s = float(readonly_retry_s)
        self.folder = os.path.join(os.fspath(root), namespace.hex(), "segments")
        self._io: ThreadPoolExecutor | None = None
        self._headers: dict[tuple[torch.dtype, tuple[int, ...]], bytes] = {}
        self._clock = clock or time.monotonic
        self._policy = make_policy(policy, capacity=self.capacity_bytes, clock=clock)
        self._index: dict[bytes, Loc] = {}
        self._segments: dict[int, Segment] = {}
        self._tomb_at: dict[bytes, int] = {}
        self._active: Segment
        self._used = 0
        self._unsynced: list[tuple[bytes, int]] = []
        self._unsynced_segments: set[int] = set()
        self._read_only_until: float | None = None
        self._last_error = ""
        self._lock = threading.RLock()
        with self._lock:
            self._open(verify_on_scan)

    # -- the six methods -------------------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        return check_key(key) in self._index

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
        self._check_put(key, record)
        size = record.nbytes
        refusal = self._refusal(size)
        if refusal:
            self.counters.add("rejected")
            return PutResult(False, reason=refusal)
        with self._lock:
            if key in self._index:
                self._policy.on_access(key)
                return PutResult(True)
            if not self._policy.admit(key, size):
                self.counters.add("rejected")
                return PutResult(False, reason="not admitted by the policy")
            evicted = self._make_room(size)
            try:
                seg_id, offset = self._append(record.chunks(), self.fsync is FsyncPolicy.ALWAYS)
            except OSError as exc:
                return PutResult(False, evicted, self._write_failed(key, exc))
            self._insert(key, (seg_id, offset, size))
            self._unsynced.append((key, size))
            recovered, self._read_only_until = self._read_only_until is not None, None
            self._maybe_compact()
        if recovered:
            LOGGER.info("%s tier: writable again", self.name)
        self.counters.add("puts")
        self.counters.add("bytes_in", size)
        return PutResult(True, evicted)

    def remove(self, key: bytes) -> bool:
        check_key(key)
        with self._lock:
            if key not in self._index:
                return False
            self._delete(key)
            self._maybe_compact()
        self.counters.add("removed")
        return True

    def usage(self) -> TierUsage:
        with self._lock:
            used, count = self._used, len(self._index)
        read_only = self._read_only_until is not None
        return TierUsage(
            self.name, self.kind, self.capacity_bytes, used, count,
            read_only=read_only, healthy=not read_only, last_error=self._last_error, counters=self._counters(),
        )  # fmt: skip

    def flush(self) -> FlushResult:
        """fsync (BATCH) the segments appended to since the last flush; return the blocks written since then."""
        with self._lock:
            pending, self._unsynced = self._unsynced, []
            live = [(k, s) for k, s in pending if k in self._index]
            if self.fsync is FsyncPolicy.BATCH:
                self._sync_segments()
        return FlushResult(tuple(k for k, _ in live), tuple(s for _, s in live))

    # -- variants and views ------------------------------------------------------------------------------------

    def get_many_into(self, keys: Iterable[bytes], outs: Iterable[torch.Tensor]) -> list[bool]:
        """`get_into` of each (key, out), in order, on `io_threads` threads."""
        return self._parallel(lambda pair: self.get_into(*pair), key_out_pairs(keys, outs))

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        """`get` of each key, in order, on `io_threads` threads."""
        return self._parallel(self.get, list(keys))

    @property
    def stats(self) -> SegmentStats:
        with self._lock:
            segs = list(self._segments.values())
            return SegmentStats(tuple(s.id for s in segs), tuple(s.size for s in segs), tuple(s.dead for s in segs),
                                self._active.id)

    def __iter__(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

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
            self.counters.add("hits")
            self.counters.add("bytes_out", size)

    def _raw_header(self, out: torch.Tensor) -> bytes | None:
        spec = (out.dtype, tuple(out.shape))
        header = self._headers.get(spec)
        if header is None:
            try:
                header = raw_header(out)
            except TypeError:
                return None
            if len(self._headers) >= HEADER_MEMO:
                self._headers.clear()
            self._headers[spec] = header
        return header

    def _parallel(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        if len(items) < 2 or self.io_threads == 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"uakv-{self.name}-io")
        return list(self._io.map(fn, items))

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

    def _delete(self, key: bytes) -> None:
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

    def _make_room(self, size: int) -> tuple[BlockRecord, ...]:
        """Evict victims until `size` more bytes fit; read each for demotion unless `demote_evicted` is False."""
        evicted: list[BlockRecord] = []
        count = 0
        while self._used + size > self.capacity_bytes and self._index:
            victim: bytes = self._policy.victims(1)[0]  # type: ignore[assignment]
            seg_id, offset, length = self._index[victim]
            if self.demote_evicted:
                try:
                    data = seg_io.read_exact(self._segments[seg_id].fd, offset, length)
                    evicted.append(parse_record(data, victim, self.namespace))
                except (RecordError, OSError) as exc:
                    self._count_bad(exc)
            self._delete(victim)
            count += 1
        if count:
            self.counters.add("evictions", count)
        return tuple(evicted)

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

    def _refusal(self, size: int) -> str:
        if size > self.capacity_bytes:
            return f"record of {size} bytes exceeds capacity {self.capacity_bytes}"
        until = self._read_only_until
        if until is not None and self._clock() < until:
            return f"read-only after: {self._last_error}"
        return ""

    def _write_failed(self, key: bytes, exc: OSError) -> str:
        if exc.errno in FULL_DISK_ERRNOS:
            first = self._read_only_until is None
            self._read_only_until = self._clock() + self.readonly_retry_s
            self.counters.add("disk_full")
            message = f"disk full ({errno.errorcode.get(exc.errno or 0, exc.errno)}) writing {self.folder}: {exc}"
            self._error(message, log=first)
            if first:
                LOGGER.error("%s tier is read-only for %.0f s; blocks are served from memory", self.name,
                             self.readonly_retry_s)
            return message
        message = f"write of block {key.hex()[:16]} failed: {exc}"
        self._error(message)
        return message

    def _error(self, message: str, log: bool = True) -> None:
        self._last_error = message
        self.counters.add("errors")
        if log:
            LOGGER.error("%s tier: %s", self.name, message)

    def _drop_bad(self, key: bytes, loc: Loc, exc: RecordError) -> None:
        LOGGER.warning("%s tier: dropping block %s: %s", self.name, key.hex()[:16], exc)
        self._count_bad(exc)
        with self._lock:
            if self._index.get(key) == loc:
                self._delete(key)
                try:  # wipe its magic: a bad name byte must not list the record under another key at start
                    os.pwrite(self._segments[loc[0]].fd, bytes(8), loc[1])
                except OSError:
                    pass

    def _count_bad(self, exc: Exception) -> None:
        self.counters.add("namespace_dropped" if isinstance(exc, NamespaceMismatchError) else "corrupt_dropped")
