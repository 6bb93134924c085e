"""`CPUTier`: blocks in host memory, with its own byte capacity and eviction policy.

Records never leave the process here, so they are kept as they are (no copy, no re-verification; a borrowed
record, whose payload is a caller's tensor, is copied once: `BlockRecord.owned`). With
`pin_memory` (default: when CUDA is present) each identity-coded payload (a block's raw bytes) is copied once,
at `put`, into a page-locked buffer of its own, so promoting it is one asynchronous DMA straight into its pool
block (`tiers.load_records`); other codecs' payloads are decoded on the host before they move, so they are kept
in ordinary memory (page-locking them would only spend pinned memory).

Invariants: `used_bytes` == sum of `record.nbytes` held <= `capacity_bytes` (also right after `resize`); the
policy tracks exactly the held keys; a record larger than the whole capacity is refused, never stored half.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Iterator

import torch

from ..policies import make_policy
from ..policies.base import Clock
from ..types import CodecKind, TierKind
from .base import PutResult, Tier, TierUsage
from .record import BlockRecord, check_key


def _require_capacity(capacity_bytes: object) -> int:
    if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 1:
        raise ValueError(f"capacity_bytes={capacity_bytes!r} must be a positive integer")
    return capacity_bytes


class CPUTier(Tier):
    """An in-memory dict of records, bounded by `capacity_bytes`, evicting by `policy` (a registry name)."""

    kind = TierKind.CPU
    durable = False

    def __init__(
        self,
        namespace: bytes,
        capacity_bytes: int,
        policy: str = "lru",
        pin_memory: bool | None = None,
        clock: Clock | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(namespace, name)
        self.capacity_bytes = _require_capacity(capacity_bytes)
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA; pass pin_memory=False or None on a CPU-only machine")
        self.pin_memory = bool(pin_memory)
        self._policy = make_policy(policy, capacity=self.capacity_bytes, clock=clock)
        self._records: dict[bytes, BlockRecord] = {}
        self._used = 0
        self._lock = threading.Lock()

    def contains(self, key: bytes) -> bool:
        return check_key(key) in self._records

    def get(self, key: bytes) -> BlockRecord | None:
        check_key(key)
        with self._lock:
            record = self._records.get(key)
            if record is not None:
                self._policy.on_access(key)
        if record is None:
            self.counters.add("misses")
            return None
        self.counters.add("hits")
        self.counters.add("bytes_out", record.nbytes)
        return record

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        """`get` of each key in order, under one lock acquisition and with one update of each counter (a
        promotion asks for a thousand blocks at once)."""
        keys = [check_key(k) for k in keys]
        with self._lock:
            found = [self._records.get(k) for k in keys]
            for key, record in zip(keys, found, strict=True):
                if record is not None:
                    self._policy.on_access(key)
        hits = [r for r in found if r is not None]
        self.counters.add("hits", len(hits))
        self.counters.add("misses", len(keys) - len(hits))
        self.counters.add("bytes_out", sum(r.nbytes for r in hits))
        return found

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        self._check_put(key, record)
        size = record.nbytes
        if size > self.capacity_bytes:
            self.counters.add("rejected")
            return PutResult(False, reason=f"record of {size} bytes exceeds capacity {self.capacity_bytes}")
        with self._lock:
            if key in self._records:  # same hash, same content: just a use
                self._policy.on_access(key)
                return PutResult(True)
            if not self._policy.admit(key, size):
                self.counters.add("rejected")
                return PutResult(False, reason="not admitted by the policy")
            evicted = self._make_room(size)
            self._records[key] = self._pinned(record) if self.pin_memory else record.owned()
            self._used += size
            self._policy.on_insert(key, size)
        self.counters.add("puts")
        self.counters.add("bytes_in", size)
        return PutResult(True, evicted)

    def remove(self, key: bytes) -> bool:
        check_key(key)
        with self._lock:
            record = self._records.pop(key, None)
            if record is None:
                return False
            self._used -= record.nbytes
            self._policy.on_remove(key)
        self.counters.add("removed")
        return True

    def resize(self, capacity_bytes: int) -> tuple[BlockRecord, ...]:
        """Set the capacity; when it shrinks, evict the policy's victims (in its order) until the held bytes
        fit. Returns the evicted records, as `put` reports them, so a store or controller can demote them."""
        capacity_bytes = _require_capacity(capacity_bytes)
        with self._lock:
            self.capacity_bytes = capacity_bytes
            self._policy.capacity = capacity_bytes
            return self._make_room(0)

    def usage(self) -> TierUsage:
        with self._lock:
            used, count = self._used, len(self._records)
        return TierUsage(self.name, self.kind, self.capacity_bytes, used, count, counters=self._counters())

    def __iter__(self) -> Iterator[bytes]:
        with self._lock:
            return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def _make_room(self, size: int) -> tuple[BlockRecord, ...]:
        """Evict policy victims until `size` more bytes fit (caller holds the lock)."""
        evicted: list[BlockRecord] = []
        while self._used + size > self.capacity_bytes:
            victims = self._policy.victims(1)
            if not victims:
                raise RuntimeError(f"tier {self.name!r}: policy offers no victim with {self._used} bytes held")
            victim = victims[0]
            record = self._records.pop(victim)  # type: ignore[call-overload]
            self._used -= record.nbytes
            self._policy.on_remove(victim)
            evicted.append(record)
        if evicted:
            self.counters.add("evictions", len(evicted))
        return tuple(evicted)

    @staticmethod
    def _pinned(record: BlockRecord) -> BlockRecord:
        """What a pinning tier keeps: an identity-coded record with its payload in page-locked host memory (one
        allocation and one copy, unless it already is page-locked and owned); any other record `owned()`."""
        if record.meta.codec is not CodecKind.IDENTITY:
            return record.owned()
        src = record.payload_tensor()
        if not record.borrowed and src.is_pinned():
            return record
        buf = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=True)
        buf.copy_(src)
        return dataclasses.replace(record, payload=memoryview(buf.numpy()), borrowed=False)
