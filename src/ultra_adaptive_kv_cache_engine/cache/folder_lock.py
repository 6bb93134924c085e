"""`FolderLock`: an exclusive, short-held lock on a folder shared by engines of one or many processes.

`fcntl.flock` on a lock file in the folder. Each `hold()` opens its own descriptor, so it excludes other
threads of this process as well as other processes. The kernel releases the lock when its holder exits or is
killed (kill -9 included): a crash never leaves the folder locked. While it holds the lock, the holder's pid
is written in the lock file, so a waiter that gives up can name it. The lock file itself is never deleted
(deleting a flock'd file lets two holders lock two different files).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".tensor-store.lock"


class FolderLockedError(TimeoutError):
    """The folder stayed locked by another holder for longer than the lock's timeout."""


class FolderLock:
    """Exclusive lock on `folder` (file `folder/name`), waited for at most `timeout_s` seconds, polled every
    `poll_s` seconds. Not re-entrant: a holder must not call `hold()` again before leaving it."""

    def __init__(self, folder: str | os.PathLike[str], name: str = LOCK_NAME, timeout_s: float = 30.0,
                 poll_s: float = 0.01) -> None:
        if timeout_s < 0 or poll_s <= 0:
            raise ValueError(f"timeout_s={timeout_s!r} must be >= 0 and poll_s={poll_s!r} > 0")
        self.folder = Path(folder)
        self.path = self.folder / name
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    @contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the lock for the `with` block; FolderLockedError (naming the folder and the holder's pid) when
        it stays taken for `timeout_s`."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._acquire(fd)
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                yield
            finally:
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def holder(self) -> int | None:
        """The pid written by the current holder, or None (not held, or the holder has not written it yet)."""
        try:
            text = self.path.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FolderLockedError(self._busy_message()) from None
                time.sleep(self.poll_s)

    def _busy_message(self) -> str:
        pid = self.holder()
        who = "an unknown process" if pid is None else f"pid {pid}"
        if pid == os.getpid():
            who += " (this process: another engine or thread on the same folder)"
        return (f"folder {self.folder} is locked by {who} (lock file {self.path.name}) and stayed locked for "
                f"{self.timeout_s:g} s")
