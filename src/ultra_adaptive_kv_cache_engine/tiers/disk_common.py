"""`DiskTierBase`: the bookkeeping every local disk tier shares, whatever its file layout.

A disk tier keeps an in-memory index (key -> where the block lies, a layout's own value `V`) whose records'
sizes add up to `used_bytes` <= `capacity_bytes`, and a policy that tracks exactly the indexed keys. This base
holds that state and what is the same for every layout: validation of the common arguments, admission and
eviction by the policy (the layout reads and drops a victim), the read-only episode after a full disk
(ENOSPC, EFBIG, EDQUOT: puts are refused with the reason for `readonly_retry_s` seconds, reads go on, the
error is in `usage().last_error` and logged once per episode), error and bad-record counting, `usage()`, the
keys written since the last flush, and batches run on `io_threads` threads.

Every method marked "lock held" runs with `self._lock` held by its caller.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from abc import abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import torch

from ..policies import make_policy
from ..policies.base import Clock
from ..types import FsyncPolicy, parse_enum
from .base import LOGGER, PutResult, Tier, TierUsage, key_out_pairs
from .cpu import _require_capacity
from .record import BlockRecord, NamespaceMismatchError, RecordError, check_key, raw_header

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")
FULL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})
HEADER_MEMO = 64
"""Distinct (dtype, shape) headers `get_into` remembers."""


class DiskTierBase(Tier, Generic[V]):
    """A tier on a local folder (`folder`, set by the layout), bounded by `capacity_bytes`, evicting by `policy`.

    Subclasses implement the six methods with their layout, plus `_read_victim` and `_drop`.
    """

    folder: str | os.PathLike[str]

    def __init__(
        self,
        namespace: bytes,
        capacity_bytes: int,
        policy: str,
        fsync: FsyncPolicy | str,
        readonly_retry_s: float,
        io_threads: int | None,
        demote_evicted: bool,
        clock: Clock | None,
        name: str | None,
    ) -> None:
        super().__init__(namespace, name)
        self.capacity_bytes = _require_capacity(capacity_bytes)
        threads = io_threads if io_threads is not None else min(8, os.cpu_count() or 1)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"io_threads={io_threads!r} must be a positive integer or None")
        self.io_threads = threads
        self.demote_evicted = bool(demote_evicted)
        self.fsync = parse_enum(FsyncPolicy, "fsync", fsync)
        self.readonly_retry_s = float(readonly_retry_s)
        self._io: ThreadPoolExecutor | None = None
        self._headers: dict[tuple[torch.dtype, tuple[int, ...]], bytes] = {}
        self._clock = clock or time.monotonic
        self._policy = make_policy(policy, capacity=self.capacity_bytes, clock=clock)
        self._index: dict[bytes, V] = {}
        self._used = 0
        self._unsynced: list[tuple[bytes, int]] = []
        self._read_only_until: float | None = None
        self._last_error = ""
        self._lock: threading.Lock | threading.RLock = threading.Lock()

    # -- shared public methods ----------------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        return check_key(key) in self._index

    def usage(self) -> TierUsage:
        with self._lock:
            used, count = self._used, len(self._index)
        read_only = self._read_only_until is not None
        return TierUsage(
            self.name, self.kind, self.capacity_bytes, used, count,
            read_only=read_only, healthy=not read_only, last_error=self._last_error, counters=self._counters(),
        )  # fmt: skip

    def resize(self, capacity_bytes: int) -> tuple[BlockRecord, ...]:
        """Set the capacity; when it shrinks, evict the policy's victims (in its order) until the indexed bytes
        fit. Returns the evicted records read for demotion (none when `demote_evicted` is False: the disk is the
        last tier), as `put` reports them; `usage().num_blocks` tells how many left."""
        capacity_bytes = _require_capacity(capacity_bytes)
        with self._lock:
            self.capacity_bytes = capacity_bytes
            self._policy.capacity = capacity_bytes
            return self._make_room(0)

    def get_many_into(self, keys: Iterable[bytes], outs: Iterable[torch.Tensor]) -> list[bool]:
        """`get_into` of each (key, out), in order, on `io_threads` threads."""
        return self._parallel(lambda pair: self.get_into(*pair), key_out_pairs(keys, outs))

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        """`get` of each key, in order; reads and checksum checks of a batch run on `io_threads` threads."""
        return self._parallel(self.get, list(keys))

    def __iter__(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._index))

    def __len__(self) -> int:
        return len(self._index)

    # -- the layout's part --------------------------------------------------------------------------------------

    @abstractmethod
    def _read_victim(self, key: bytes) -> BlockRecord:
        """The verified record of indexed `key`, for demotion; RecordError or OSError if it cannot be (lock held)."""

    @abstractmethod
    def _drop(self, key: bytes) -> None:
        """Unindex indexed `key` (used bytes, policy) and delete it from the medium (lock held)."""

    # -- puts ---------------------------------------------------------------------------------------------------

    def _precheck(self, key: bytes, record: BlockRecord) -> PutResult | None:
        """Raise on bad input; the refusal of a record too large or of a read-only tier, or None to go on."""
        self._check_put(key, record)
        refusal = self._refusal(record.nbytes)
        if refusal:
            self.counters.add("rejected")
            return PutResult(False, reason=refusal)
        return None

    def _admit(self, key: bytes, size: int) -> PutResult | None:
        """The answer for a key already held (an access) or not admitted by the policy, or None (lock held)."""
        if key in self._index:
            self._policy.on_access(key)
            return PutResult(True)
        if not self._policy.admit(key, size):
            self.counters.add("rejected")
            return PutResult(False, reason="not admitted by the policy")
        return None

    def _make_room(self, size: int) -> tuple[BlockRecord, ...]:
        """Evict victims until `size` more bytes fit; read each for demotion (unless `demote_evicted` is False:
        the disk is the last tier), then drop it (lock held)."""
        evicted: list[BlockRecord] = []
        count = 0
        while self._used + size > self.capacity_bytes and self._index:
            victim: bytes = self._policy.victims(1)[0]  # type: ignore[assignment]
            if self.demote_evicted:
                try:
                    evicted.append(self._read_victim(victim))
                except (RecordError, OSError) as exc:
                    self._count_bad(exc)
            self._drop(victim)
            count += 1
        if count:
            self.counters.add("evictions", count)
        return tuple(evicted)

    def _writable_again(self) -> bool:
        """End a read-only episode after a successful write; True if there was one (lock held)."""
        recovered, self._read_only_until = self._read_only_until is not None, None
        return recovered

    def _count_put(self, size: int, recovered: bool) -> None:
        if recovered:
            LOGGER.info("%s tier: writable again", self.name)
        self.counters.add("puts")
        self.counters.add("bytes_in", size)

    def _take_unsynced(self) -> list[tuple[bytes, int]]:
        """The (key, size) written since the last flush and still indexed; the list starts afresh (lock held)."""
        pending, self._unsynced = self._unsynced, []
        return [(k, s) for k, s in pending if k in self._index]

    # -- reads --------------------------------------------------------------------------------------------------

    def _count_hit(self, size: int) -> None:
        self.counters.add("hits")
        self.counters.add("bytes_out", size)

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

    def _parallel(self, fn: Callable[[T], R], items: list[T]) -> list[R]:
        if len(items) < 2 or self.io_threads == 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._io is None:
                self._io = ThreadPoolExecutor(self.io_threads, thread_name_prefix=f"uakv-{self.name}-io")
        return list(self._io.map(fn, items))

    # -- faults -------------------------------------------------------------------------------------------------

    def _refusal(self, size: int) -> str:
        if size > self.capacity_bytes:
            return f"record of {size} bytes exceeds capacity {self.capacity_bytes}"
        until = self._read_only_until
        if until is not None and self._clock() < until:
            return f"read-only after: {self._last_error}"
        return ""

    def _write_failed(self, key: bytes, exc: OSError) -> str:
        """Record a failed write; a full disk starts (or extends) a read-only episode. Returns the reason."""
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

    def _report_bad(self, key: bytes, exc: RecordError) -> None:
        LOGGER.warning("%s tier: dropping block %s: %s", self.name, key.hex()[:16], exc)
        self._count_bad(exc)

    def _count_bad(self, exc: Exception) -> None:
        self.counters.add("namespace_dropped" if isinstance(exc, NamespaceMismatchError) else "corrupt_dropped")
