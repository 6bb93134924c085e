"""`SharedSnapshot`: a tensor store's snapshot file, shared by every engine (thread or process) on one folder.

Guarantee: no sequence of engines opening the folder, storing, persisting and being killed loses an entry that
a `persist()` acknowledged. An acknowledged entry leaves the snapshot only when an engine that has read it
(by `load` or by a merge) evicts it, through its policy over capacity or by `evict`/`clear` (or cannot hold
it: an entry larger than its `max_tokens`), and then persists.

How: `persist` merges instead of replacing. Under the folder's lock (`FolderLock`, held only for the read and
the write) it reads the snapshot on disk and restores into the cache every entry written since this engine
last read or wrote the file (a merge is a load: it can evict through the policy, so capacity holds), then
writes the cache's entries (crash-safe rename, `tensor_file.py`). Each write stamps the entries it adds with a
random stamp; an entry keeps its stamp while its value stays unchanged in memory. An entry on disk whose stamp
this engine has seen, and which it no longer holds, is one it evicted: it is dropped. Any other entry on disk
was written by someone else since: it is merged. So two live engines, in one process or in two, can share the
folder, and an engine need not `load()` before it `persist()`s.

A snapshot that cannot be trusted (corrupt, wrong format) is never served: `load` reports it and leaves it,
`persist` moves it aside (`<name>.rejected`) before writing a new one.
"""

from __future__ import annotations

import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import torch

from ..metrics import LOGGER_NAME
from .base_cache import BaseKVCache
from .folder_lock import FolderLock
from .tensor_file import (
    SnapshotError,
    load_snapshot,
    remove_orphan_temps,
    remove_stale_temps,
    save_snapshot,
    snapshot_path,
)

LOGGER = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class SnapshotRead:
    """What `load` did: entries added to the cache, and whether the file on disk was refused."""

    restored: int
    rejected: bool


@dataclass(frozen=True)
class SnapshotWrite:
    """What `persist` did: entries and bytes written, entries of other writers merged into the cache first,
    and whether an untrusted file was moved aside."""

    entries: int
    nbytes: int
    merged: int
    rejected: bool


class SharedSnapshot:
    """The snapshot of one tenant's tensor store in `folder`, kept in step with one cache.

    Invariant: `_seen` maps each digest of the file as this engine last read or wrote it to its stamp there.
    Every read and write holds `lock`, so `_seen` always describes one whole version of the file.
    """

    def __init__(self, folder: str | os.PathLike[str], tenant_salt: str = "", lock: FolderLock | None = None) -> None:
        self.folder = Path(folder)
        self.tenant_salt = tenant_salt
        self.path = snapshot_path(self.folder, tenant_salt)
        self.lock = lock if lock is not None else FolderLock(self.folder)
        self._seen: dict[bytes, str] = {}
        if self.folder.is_dir():  # temporary files of writers killed mid-write (their pid is gone)
            remove_orphan_temps(self.path)

    def load(self, cache: BaseKVCache) -> SnapshotRead:
        """Restore every entry of the snapshot that `cache` does not hold (it keeps its own for the others)."""
        with self.lock.hold():
            entries, stamps = self._read(cache)
            if entries is None:
                return SnapshotRead(0, True)
            restored = cache.restore(entries, stamps)
            self._seen = stamps
        return SnapshotRead(restored, False)

    def persist(self, cache: BaseKVCache) -> SnapshotWrite:
        """Merge the snapshot on disk into `cache` (see the module docstring), then write `cache`'s entries."""
        with self.lock.hold():
            remove_stale_temps(self.path)
            entries, stamps = self._read(cache)
            rejected = entries is None
            if rejected:
                self._set_aside()
                entries, stamps = {}, {}
            fresh = {d: v for d, v in entries.items() if self._seen.get(d) != stamps[d]}
            merged = cache.restore(fresh, stamps)
            held = cache.stamped()
            stamp = secrets.token_hex(8)
            written = {d: e.stamp or stamp for d, e in held.items()}
            nbytes = save_snapshot(self.path, {d: e.value for d, e in held.items()}, written, self.tenant_salt)
            cache.mark_written({d: (e.value, stamp) for d, e in held.items() if e.stamp is None})
            self._seen = written
        return SnapshotWrite(len(held), nbytes, merged, rejected)

    def _read(self, cache: BaseKVCache) -> tuple[dict[bytes, torch.Tensor] | None, dict[bytes, str]]:
        try:
            return load_snapshot(self.path, self.tenant_salt)
        except SnapshotError as exc:
            LOGGER.error("tensor store snapshot in %s not loaded: %s", self.folder, exc)
            cache.counters.add("snapshots_rejected")
            return None, {}

    def _set_aside(self) -> None:
        aside = self.path.with_name(f"{self.path.name}.rejected")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        LOGGER.error("untrusted tensor store snapshot moved aside to %s", aside)
