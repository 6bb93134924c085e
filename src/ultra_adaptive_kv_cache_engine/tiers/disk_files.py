"""File mechanics of the disk tier: block paths, crash-safe writes, fsync, and the start-up folder scan.

Layout: <root>/<namespace hex>/<first 2 hex of hash>/<hash hex>.blk. A write goes to a unique temporary name
in the same folder (one `writev` of header, payload and checksum), is optionally fsynced, renamed over the final
name (atomic on POSIX), and the folder is optionally fsynced, so a reader sees either no file or a whole one; a
crash leaves at most temporary files, which the next scan deletes. A read can land the payload straight in the
caller's memory (`read_record_into`: no intermediate buffer), verified there before it is reported.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .record import CHECKSUM_BYTES, checksum_of

SUFFIX = ".blk"
TEMP_MARK = ".tmp-"
_BLOCK_NAME = re.compile(r"^[0-9a-f]{64}\.blk$")
_SHARD_NAME = re.compile(r"^[0-9a-f]{2}$")
_counter = itertools.count()
_counter_lock = threading.Lock()
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def block_path(folder: str, key: bytes) -> str:
    """`<folder>/<first 2 hex>/<hash hex>.blk` (a plain string: this is on every read and write)."""
    name = key.hex()
    return f"{folder}/{name[:2]}/{name}{SUFFIX}"


def temp_path(final: str) -> str:
    """A name no other writer (thread or process) uses at the same time, in the final name's folder."""
    with _counter_lock:
        n = next(_counter)
    return f"{final}{TEMP_MARK}{os.getpid()}-{threading.get_ident()}-{n}"


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: str | os.PathLike[str]) -> None:
    """Remove `path` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_all(fd: int, chunks: Sequence[bytes | memoryview]) -> None:
    """Write `chunks` in order with as few `writev` calls as the kernel allows (no concatenation copy)."""
    views = [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]
    while views:
        written = os.writev(fd, views)
        if written <= 0:
            raise OSError(errno.EIO, f"writev wrote {written} of {sum(v.nbytes for v in views)} bytes")
        while views and written >= views[0].nbytes:
            written -= views[0].nbytes
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def open_folder(folder: str) -> int:
    """A descriptor of `folder` opened WITHOUT following a symlink at its last component (a shard folder swapped
    for a link out of the root is refused: OSError ELOOP/ENOTDIR); a missing folder is made (0700), once."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        return os.open(folder, flags)
    except FileNotFoundError:  # the shard folder was removed behind our back: make it again, once
        os.makedirs(folder, mode=0o700, exist_ok=True)
        return os.open(folder, flags)


def atomic_write(final: str, chunks: Sequence[bytes | memoryview], fsync: bool) -> None:
    """Write `chunks` to `final` through a temporary name and a rename; fsync file and folder if `fsync`.

    The file is created 0600, relative to a descriptor of its folder opened without following symlinks, so a
    block is never written through a symlinked shard folder. On any error the temporary file is removed and
    the error re-raised; `final` is untouched.
    """
    folder, name = os.path.split(final)
    tmp = os.path.basename(temp_path(final))
    dir_fd = open_folder(folder)
    try:
        fd = os.open(tmp, _CREATE | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            try:
                write_all(fd, chunks)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
        if fsync:
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_record_into(path: str, head: bytes, out: memoryview) -> bool:
    """Read the record at `path` with ONE `readv`: its first bytes into a small buffer, its payload straight into
    `out`. True if the file is exactly `head` (the expected prefix and JSON header, which name the block and its
    namespace), then `out.nbytes` of payload, then the checksum of both (verified over `out` in place).

    False for anything else (another header, size, name or checksum): the caller reads the whole record the
    ordinary way, which classifies and counts the fault. OSError from the file system. Unless True is returned,
    `out` may have been overwritten.
    """
    got_head = bytearray(len(head))
    tail = bytearray(CHECKSUM_BYTES + 1)  # one spare byte: a file longer than its record fills it
    fd = os.open(path, os.O_RDONLY)
    try:  # a regular file reads short only at its end (or on a signal: then the ordinary way reads it)
        got = os.readv(fd, (got_head, out, tail))
    finally:
        os.close(fd)
    return (
        got == len(head) + out.nbytes + CHECKSUM_BYTES
        and got_head == head
        and checksum_of(head, out) == tail[:CHECKSUM_BYTES]
    )


def read_file(path: str | os.PathLike[str], limit: int | None = None) -> memoryview:
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


