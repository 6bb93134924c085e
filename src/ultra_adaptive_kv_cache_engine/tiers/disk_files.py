"""File mechanics of the disk tier: block paths, crash-safe writes, fsync, and the start-up folder scan.

Layout: <root>/<namespace hex>/<first 2 hex of hash>/<hash hex>.blk. A write goes to a unique temporary name
in the same folder, is optionally fsynced, renamed over the final name (atomic on POSIX), and the folder is
optionally fsynced, so a reader sees either no file or a whole one; a crash leaves at most temporary files,
which the next scan deletes.
"""

from __future__ import annotations

import itertools
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUFFIX = ".blk"
TEMP_MARK = ".tmp-"
_BLOCK_NAME = re.compile(r"^[0-9a-f]{64}\.blk$")
_SHARD_NAME = re.compile(r"^[0-9a-f]{2}$")
_counter = itertools.count()
_counter_lock = threading.Lock()


def block_path(folder: Path, key: bytes) -> Path:
    name = key.hex()
    return folder / name[:2] / (name + SUFFIX)


def temp_path(final: Path) -> Path:
    """A name no other writer (thread or process) uses at the same time, in the final name's folder."""
    with _counter_lock:
        n = next(_counter)
    return final.with_name(f"{final.name}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}-{n}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(final: Path, chunks: Sequence[bytes | memoryview], fsync: bool) -> None:
    """Write `chunks` to `final` through a temporary name and a rename; fsync file and folder if `fsync`.

    On any error the temporary file is removed and the error re-raised; `final` is untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                while view.nbytes:
                    written = os.write(fd, view)
                    view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(final.parent)


def read_file(path: Path, limit: int | None = None) -> memoryview:
    """The whole file (or its first `limit` bytes) read straight into one fresh buffer, no zeroing, no resize."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size if limit is None else limit
        buf = np.empty(size + 1, dtype=np.uint8)  # one spare byte: a file that grew is noticed, not cut
        view = memoryview(buf)
        got = 0
        while got < size + 1:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
        if got > size and limit is None:
            return memoryview(bytes(view[:got]) + f.read())
        return view[: min(got, size)]


@dataclass(frozen=True)
class ScanEntry:
    """A block file found by the scan."""

    key: bytes
    path: Path
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class ScanResult:
    entries: tuple[ScanEntry, ...]
    temp_removed: int


def scan_folder(folder: Path) -> ScanResult:
    """Every `<hash>.blk` under `folder`'s shard folders, oldest first; leftover temporary files are deleted."""
    entries: list[ScanEntry] = []
    temp_removed = 0
    if not folder.is_dir():
        return ScanResult((), 0)
    for shard in os.scandir(folder):
        if not (shard.is_dir(follow_symlinks=False) and _SHARD_NAME.match(shard.name)):
            continue
        for entry in os.scandir(shard.path):
            if TEMP_MARK in entry.name:
                Path(entry.path).unlink(missing_ok=True)
                temp_removed += 1
            elif _BLOCK_NAME.match(entry.name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                key = bytes.fromhex(entry.name[: -len(SUFFIX)])
                entries.append(ScanEntry(key, Path(entry.path), st.st_size, st.st_mtime_ns))
    entries.sort(key=lambda e: (e.mtime_ns, e.path.name))
    return ScanResult(tuple(entries), temp_removed)


