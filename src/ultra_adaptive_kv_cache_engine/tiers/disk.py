"""`DiskTier`: one file per block under a folder per namespace, crash-safe, rebuilt by a scan at start.

Durability follows `FsyncPolicy`: ALWAYS fsyncs file and folder before `put` returns; BATCH fsyncs what was
written since the last `flush()`; NEVER leaves it to the OS. Whatever the policy, a reader never sees a torn
file under a block's name (temporary name + rename), and every read is verified (checksum, block hash,
namespace): a bad file is deleted and counted (`corrupt_dropped`, `namespace_dropped`), never served.
`get_into` reads an identity-coded payload straight into the caller's tensor and verifies it there.

A full disk (ENOSPC, EFBIG, EDQUOT) turns the tier read-only for `readonly_retry_s` seconds: puts are
refused with the reason, reads go on, the error is in `usage().last_error` and logged once per episode
(`DiskTierBase`, shared with `SegmentDiskTier`).

Invariants: the index holds exactly the keys whose files were written whole (or found by the scan);
`used_bytes` == sum of their sizes <= `capacity_bytes`; the policy tracks exactly the indexed keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from ..compression.codec import writable_bytes
from ..policies.base import Clock
from ..types import FsyncPolicy, TierKind
from . import disk_files as files
from .base import LOGGER, FlushResult, PutResult, require_tensor
from .disk_common import DiskTierBase
from .record import (
    PREFIX_BYTES,
    BlockRecord,
    RecordError,
    check_key,
    check_names,
    parse_prefix,
    parse_record,
    record_head,
)

SCAN_PROGRESS_MIN = 1000
"""Show a progress bar (stderr) when the start-up scan finds at least this many files."""


class DiskTier(DiskTierBase[int]):
    """Blocks as files under `<root>/<namespace hex>/`, bounded by `capacity_bytes`, evicting by `policy`.
    The index maps each key to its file's size."""

    kind = TierKind.DISK
    durable = True
    folder: Path

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
        super().__init__(namespace, capacity_bytes, policy, fsync, readonly_retry_s, io_threads, demote_evicted, clock,
                         name)
        self.folder = Path(root) / namespace.hex()
        self._root = os.fspath(self.folder)
        self._prepare_folders()
        self._scan(verify_on_scan)

    # -- the six methods -------------------------------------------------------------------------------------

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

    def put_many(self, items: Iterable[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        """`put` of each (key, record), in order; writes of a batch run on `io_threads` threads."""
        return self._parallel(lambda item: self.put(*item), list(items))

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
            if key not in self._index:
                return False
            self._drop(key)
        self.counters.add("removed")
        return True

    def flush(self) -> FlushResult:
        """fsync (BATCH) the files and folders written since the last flush; return their keys and bytes."""
        with self._lock:
            live = self._take_unsynced()
        if self.fsync is FsyncPolicy.BATCH and live:
            try:
                for key, _ in live:
                    files.fsync_file(self._path(key))
                for shard in sorted({os.path.dirname(self._path(k)) for k, _ in live}):
                    files.fsync_dir(shard)
            except OSError as exc:
                self._error(f"fsync failed: {exc}")
        return FlushResult(tuple(k for k, _ in live), tuple(s for _, s in live))

    # -- internals ----------------------------------------------------------------------------------------------

    def _path(self, key: bytes) -> str:
        return files.block_path(self._root, key)

    def _served(self, key: bytes, size: int) -> None:
        with self._lock:
            if key in self._index:
                self._policy.on_access(key)
        self._count_hit(size)

    def _prepare_folders(self) -> None:
        """Create the 256 shard folders once, 0700 (and make their names durable unless fsync is NEVER); a shard
        that is a symlink (or a file) is replaced by a real folder: blocks are never written out of the root."""
        shards = [f"{i:02x}" for i in range(256)]
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        present = {e.name for e in os.scandir(self.folder) if e.is_dir(follow_symlinks=False)}
        missing = [s for s in shards if s not in present]
        if not missing:
            return
        for shard in missing:
            path = self.folder / shard
            if path.is_symlink() or path.exists():
                LOGGER.warning("%s tier: %s is not a folder (a symlink?); replacing it with one", self.name, path)
                path.unlink()
            path.mkdir(mode=0o700)
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

    def _read_victim(self, key: bytes) -> BlockRecord:
        return parse_record(files.read_file(self._path(key)), key, self.namespace)

    def _drop(self, key: bytes) -> None:
        self._used -= self._index.pop(key)
        self._policy.on_remove(key)
        files.unlink(self._path(key))

    def _committed(self, key: bytes, size: int) -> None:
        with self._lock:
            if key in self._index:  # a concurrent put of the same block won: undo this reservation
                self._used -= size
                return
            self._index[key] = size
            self._policy.on_insert(key, size)
            self._unsynced.append((key, size))
            recovered = self._writable_again()
        self._count_put(size, recovered)

    def _forget(self, key: bytes, size: int, unlink: bool) -> None:
        with self._lock:
            if self._index.get(key) == size:
                del self._index[key]
                self._used -= size
                self._policy.on_remove(key)
                if unlink:
                    files.unlink(self._path(key))

    def _drop_bad(self, key: bytes, size: int, exc: RecordError) -> None:
        self._report_bad(key, exc)
        self._forget(key, size, unlink=True)
