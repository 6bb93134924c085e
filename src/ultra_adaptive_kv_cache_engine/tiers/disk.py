"""`DiskTier`: one file per block under a folder per namespace, crash-safe, rebuilt by a scan at start.

Durability follows `FsyncPolicy`: ALWAYS fsyncs file and folder before `put` returns; BATCH fsyncs what was
written since the last `flush()`; NEVER leaves it to the OS. Whatever the policy, a reader never sees a torn
file under a block's name (temporary name + rename), and every read is verified (checksum, block hash,
namespace): a bad file is deleted and counted (`corrupt_dropped`, `namespace_dropped`), never served.
`get_into` reads an identity-coded payload straight into the caller's tensor and verifies it there.

A full disk (ENOSPC, EFBIG, EDQUOT) turns the tier read-only for `readonly_retry_s` seconds: puts are
refused with the reason, reads go on, the error is in `usage().last_error` and logged once per episode.

Invariants: the index holds exactly the keys whose files were written whole (or found by the scan);
`used_bytes` == sum of their sizes <= `capacity_bytes`; the policy tracks exactly the indexed keys.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from ..compression.codec import writable_bytes
from ..policies import make_policy
from ..policies.base import Clock
from ..types import FsyncPolicy, TierKind, parse_enum
from . import disk_files as files
from .base import LOGGER, FlushResult, PutResult, Tier, TierUsage, key_out_pairs, require_tensor
from .cpu import _require_capacity
from .record import (
    PREFIX_BYTES,
    BlockRecord,
    NamespaceMismatchError,
    RecordError,
    check_key,
    check_names,
    parse_prefix,
    parse_record,
    raw_header,
    record_head,
)

T = TypeVar("T")
R = TypeVar("R")
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
HEADER_MEMO = 64
"""Distinct (dtype, shape) headers `get_into` remembers."""
SCAN_PROGRESS_MIN = 1000
"""Show a progress bar (stderr) when the start-up scan finds at least this many files."""


class DiskTier(Tier):
    """Blocks as files under `<root>/<namespace hex>/`, bounded by `capacity_bytes`, evicting by `policy`."""

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
        clock: Clock | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(namespace, name)
        self.capacity_bytes = _require_capacity(capacity_bytes)
        threads = io_threads if io_threads is not None else min(8, os.cpu_count() or 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"io_threads={io_threads!r} must be a positive integer or None")
        self.io_threads = threads
        self.demote_evicted = bool(demote_evicted)
        self._io: ThreadPoolExecutor | None = None
        self.fsync = parse_enum(FsyncPolicy, "fsync", fsync)
        self.readonly_retry_s = float(readonly_retry_s)
        self.folder = Path(root) / namespace.hex()
        self._root = os.fspath(self.folder)
        self._headers: dict[tuple[torch.dtype, tuple[int, ...]], bytes] = {}
        self._clock = clock or time.monotonic
        self._policy = make_policy(policy, capacity=self.capacity_bytes, clock=clock)
        self._index: dict[bytes, int] = {}
        self._used = 0
        self._unsynced: list[tuple[bytes, int]] = []
        self._read_only_until: float | None = None
        self._last_error = ""
        self._lock = threading.Lock()
        self._prepare_folders()
        self._scan(verify_on_scan)

    # -- the six methods -------------------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        return check_key(key) in self._index

    def get(self, key: bytes) -> BlockRecord | None:
        check_key(key)
        with self._lock:
            size = self._index.get(key)
        if size is None:
            self.counters.add("misses")
            return None
        try:
            record = parse_record(files.read_file(self._path(key)), key, self.namespace)
        except FileNotFoundError:
            self._forget(key, size, unlink=False)
            self.counters.add("misses")
            return None
        except RecordError as exc:
            self._drop_bad(key, size, exc)
            self.counters.add("misses")
            return None
        except OSError as exc:
            self._error(f"read of block {key.hex()[:16]} failed: {exc}")
            self.counters.add("misses")
            return None
        self._served(key, record.nbytes)
        return record

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """`get` into `out`: an identity payload is read from the file straight into a contiguous CPU `out` and
        verified there (no intermediate buffer, no decode copy); anything else, or any doubt (a bad or odd file),
        goes the way of `get` + decode, which classifies, counts and drops what is bad."""
        check_key(key)
        view = writable_bytes(require_tensor(out))
        with self._lock:
            size = self._index.get(key)
        if size is None:
            self.counters.add("misses")
            return False
        header = self._raw_header(out) if view is not None else None
        if view is not None and header is not None:
            try:
                read = files.read_record_into(self._path(key), record_head(key, self.namespace, header, view.nbytes),
                                              view)
            except OSError:
                read = False
            if read:
                self._served(key, size)
                return True
        return super().get_into(key, out)

    def get_many_into(self, keys: Iterable[bytes], outs: Iterable[torch.Tensor]) -> list[bool]:
        """`get_into` of each (key, out), in order, on `io_threads` threads."""
        return self._parallel(lambda pair: self.get_into(*pair), key_out_pairs(keys, outs))

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        """`get` of each key, in order; reads and checksum checks of a batch run on `io_threads` threads."""
        return self._parallel(self.get, list(keys))

    def put_many(self, items: Iterable[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        """`put` of each (key, record), in order; writes of a batch run on `io_threads` threads."""
        return self._parallel(lambda item: self.put(*item), list(items))

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
            self._used += size  # reserved while the file is written
        try:
            files.atomic_write(self._path(key), record.chunks(), self.fsync is FsyncPolicy.ALWAYS)
        except OSError as exc:
            with self._lock:
                self._used -= size
            return PutResult(False, evicted, self._write_failed(key, exc))
        self._committed(key, size)
        return PutResult(True, evicted)

    def remove(self, key: bytes) -> bool:
        check_key(key)
        with self._lock:
            size = self._index.pop(key, None)
            if size is None:
                return False
            self._used -= size
            self._policy.on_remove(key)
            files.unlink(self._path(key))
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
        """fsync (BATCH) the files and folders written since the last flush; return their keys and bytes."""
        with self._lock:
            pending, self._unsynced = self._unsynced, []
            live = [(k, s) for k, s in pending if k in self._index]
        if self.fsync is FsyncPolicy.BATCH and live:
            try:
                for key, _ in live:
                    files.fsync_file(self._path(key))
                for shard in sorted({os.path.dirname(self._path(k)) for k, _ in live}):
                    files.fsync_dir(shard)
            except OSError as exc:
                self._error(f"fsync failed: {exc}")
        return FlushResult(tuple(k for k, _ in live), tuple(s for _, s in live))

    def __iter__(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

    # -- internals ----------------------------------------------------------------------------------------------

    def _path(self, key: bytes) -> str:
        return files.block_path(self._root, key)

    def _raw_header(self, out: torch.Tensor) -> bytes | None:
        """`raw_header(out)`, remembered per dtype and shape (a tier sees few; the memo is cleared when large);
        None for a dtype no record stores."""
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

    def _served(self, key: bytes, size: int) -> None:
        with self._lock:
            if key in self._index:
                self._policy.on_access(key)
        self.counters.add("hits")
        self.counters.add("bytes_out", size)

    def _parallel(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        if len(items) < 2 or self.io_threads == 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"uakv-{self.name}-io")
        return list(self._io.map(fn, items))

    def _prepare_folders(self) -> None:
        """Create the 256 shard folders once (and make their names durable unless fsync is NEVER)."""
        shards = [f"{i:02x}" for i in range(256)]
        present = set(os.listdir(self.folder)) if self.folder.is_dir() else set()
        missing = [s for s in shards if s not in present]
        if not missing:
            return
        for shard in missing:
            (self.folder / shard).mkdir(parents=True, exist_ok=True)
        if self.fsync is not FsyncPolicy.NEVER:
            files.fsync_dir(self.folder)
            files.fsync_dir(self.folder.parent)

    def _scan(self, verify: bool) -> None:
        """Rebuild the index from the folder: oldest files first, bad ones deleted and counted."""
        found = files.scan_folder(self.folder)
        if found.temp_removed:
            self.counters.add("temp_removed", found.temp_removed)
        entries = found.entries
        progress = tqdm(entries, desc=f"{self.name} tier scan", unit="block", disable=len(entries) < SCAN_PROGRESS_MIN)
        bad: list[Exception] = []
        for entry in progress:
            try:
                if verify:
                    parse_record(files.read_file(entry.path), entry.key, self.namespace)
                else:
                    prefix = parse_prefix(files.read_file(entry.path, PREFIX_BYTES))
                    check_names(prefix, entry.key, self.namespace)
                    if prefix.total_len != entry.size:
                        raise RecordError(f"file has {entry.size} bytes; its prefix says {prefix.total_len}")
            except (RecordError, OSError) as exc:
                self._count_bad(exc)
                bad.append(exc)
                entry.path.unlink(missing_ok=True)
                continue
            self._index[entry.key] = entry.size
            self._used += entry.size
            self._policy.on_insert(entry.key, entry.size)
        if bad:
            LOGGER.warning("%s tier: dropped %d unreadable block file(s) at start (first: %s)", self.name, len(bad),
                           bad[0])
        with self._lock:
            dropped = self._make_room(0)  # the capacity may have shrunk since the files were written
        if dropped:
            LOGGER.info("%s tier: dropped %d blocks over capacity at start", self.name, len(dropped))
        self.counters.add("scanned", len(self._index))

    def _make_room(self, size: int) -> tuple[BlockRecord, ...]:
        """Evict victims until `size` more bytes fit; read each for demotion (unless `demote_evicted` is False:
        the disk is the last tier), then delete (lock held)."""
        evicted: list[BlockRecord] = []
        count = 0
        while self._used + size > self.capacity_bytes and self._index:
            victim = self._policy.victims(1)[0]
            vsize = self._index.pop(victim)  # type: ignore[call-overload]
            self._used -= vsize
            self._policy.on_remove(victim)
            path = self._path(victim)  # type: ignore[arg-type]
            if self.demote_evicted:
                try:
                    evicted.append(parse_record(files.read_file(path), victim, self.namespace))  # type: ignore[arg-type]
                except (RecordError, OSError) as exc:
                    self._count_bad(exc)
            files.unlink(path)
            count += 1
        if count:
            self.counters.add("evictions", count)
        return tuple(evicted)

    def _committed(self, key: bytes, size: int) -> None:
        with self._lock:
            if key in self._index:  # a concurrent put of the same block won: undo this reservation
                self._used -= size
                return
            self._index[key] = size
            self._policy.on_insert(key, size)
            self._unsynced.append((key, size))
            recovered = self._read_only_until is not None
            self._read_only_until = None
        if recovered:
            LOGGER.info("%s tier: writable again", self.name)
        self.counters.add("puts")
        self.counters.add("bytes_in", size)

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

    def _forget(self, key: bytes, size: int, unlink: bool) -> None:
        with self._lock:
            if self._index.get(key) == size:
                del self._index[key]
                self._used -= size
                self._policy.on_remove(key)
                if unlink:
                    files.unlink(self._path(key))

    def _drop_bad(self, key: bytes, size: int, exc: RecordError) -> None:
        LOGGER.warning("%s tier: dropping block %s: %s", self.name, key.hex()[:16], exc)
        self._count_bad(exc)
        self._forget(key, size, unlink=True)

    def _count_bad(self, exc: Exception) -> None:
        self.counters.add("namespace_dropped" if isinstance(exc, NamespaceMismatchError) else "corrupt_dropped")
