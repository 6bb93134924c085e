"""The tier interface: six public methods (contains, get, put, remove, usage, flush); variants for free.

Variants of `get` and `put` come from this base class and tiers may override them for speed: `get_many`,
`put_many` (batches), and `get_into` / `get_many_into`, which decode a block straight into a caller's tensor
(a pool slot, a reused or page-locked host buffer), so a load ends where the block is needed, with no fresh
buffer per block.

A tier holds `BlockRecord`s by their 32-byte block hash, for ONE namespace (the 32-byte digest given at
construction): `put` refuses records of another namespace, and whatever a tier reads back from a medium is
verified against that namespace, so two namespaces (two models, two tenants) never see each other's blocks.

Invariants every tier keeps:
- `get` returns a record whose bytes were verified (or never left this process), or None; a stored block
  that is torn, flipped or of another namespace is never returned: it is counted and dropped.
- I/O failures (disk full, Redis down) never raise into the caller: they count as `errors`, are logged once,
  and the operation reports a miss / `PutResult(stored=False, reason=...)`.
- Bad input (a key that is not 32 bytes, a record of another namespace or under another hash) raises.
- `put` reports the records it evicted to make room, so a store can demote them to the next tier.
- Every tier is thread-safe.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..metrics import Counters
from ..types import TierKind
from .record import BlockRecord, CorruptBlockError, check_key, check_out

LOGGER = logging.getLogger("ultra_adaptive_kv_cache_engine.tiers")

COUNTERS = (
    "hits", "misses", "puts", "bytes_in", "bytes_out", "evictions", "removed", "rejected",
    "corrupt_dropped", "namespace_dropped", "errors",
)  # fmt: skip
"""Counters every tier reports (zero until something happens); tiers may add their own."""


@dataclass(frozen=True)
class TierUsage:
    """A snapshot of one tier: capacity and fill (None where the tier cannot know), health, counters."""

    name: str
    kind: TierKind | None
    capacity_bytes: int | None
    used_bytes: int | None
    num_blocks: int | None
    read_only: bool = False
    healthy: bool = True
    last_error: str = ""
    counters: Mapping[str, int] = field(default_factory=dict)
    children: tuple[TierUsage, ...] = ()


@dataclass(frozen=True)
class PutResult:
    """What `put` did: stored or not (and why not), and the records it evicted to make room."""

    stored: bool
    evicted: tuple[BlockRecord, ...] = ()
    reason: str = ""


@dataclass(frozen=True)
class FlushResult:
    """The blocks written since the previous flush (keys[i] of sizes[i] bytes), now as durable as the tier's
    fsync policy makes them."""

    keys: tuple[bytes, ...] = ()
    sizes: tuple[int, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(self.sizes)


class Tier(ABC):
    """One place where blocks live. Subclasses implement the five abstract methods; `flush` is optional."""

    kind: ClassVar[TierKind | None] = None
    durable: ClassVar[bool] = False
    """True if blocks survive the process (disk, Redis): what a store's flush copies volatile blocks into."""

    def __init__(self, namespace: bytes, name: str | None = None) -> None:
        self.namespace = check_key(namespace, "namespace")
        self.name = name or (self.kind.value if self.kind is not None else type(self).__name__)
        self.counters = Counters()

    @abstractmethod
    def contains(self, key: bytes) -> bool:
        """True if `get(key)` would find the block now (a later verification may still drop it)."""

    @abstractmethod
    def get(self, key: bytes) -> BlockRecord | None:
        """The verified record of `key`, or None (absent, dropped as corrupt, or the medium failed)."""

    @abstractmethod
    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        """Store `record` under `key` (== record.block_hash), evicting by the tier's policy if needed."""

    @abstractmethod
    def remove(self, key: bytes) -> bool:
        """Drop `key`; True if it was there."""

    @abstractmethod
    def usage(self) -> TierUsage:
        """Capacity, fill, health and counters now."""

    def flush(self) -> FlushResult:
        """Make pending writes durable (per the tier's policy); report what was written since the last flush."""
        return FlushResult()

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        """`get` for each key, in order (tiers with a round trip per call override this with one batch)."""
        return [self.get(k) for k in keys]

    def put_many(self, items: Iterable[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        """`put` for each (key, record), in order."""
        return [self.put(k, r) for k, r in items]

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        """Decode the verified block of `key` into `out` (its shape and dtype); True if `out` now holds it.

        False is a miss (absent, dropped as corrupt, the medium failed); after a miss `out`'s contents are
        unspecified (a tier may have read into it before it found the block bad). TypeError if `out` is not a
        tensor; ValueError if the block is not of `out`'s shape and dtype (checked on the verified record).
        This default is `get` then one decode copy; disk and Redis tiers override it to skip buffers.
        """
        require_tensor(out)
        record = self.get(key)
        return record is not None and self._decode_into(record, out)

    def get_many_into(self, keys: Iterable[bytes], outs: Iterable[torch.Tensor]) -> list[bool]:
        """`get_into` for each (key, out), in order (ValueError if the two lengths differ); this default is one
        `get_many` (one round trip where the tier batches), then one decode copy per block."""
        pairs = key_out_pairs(keys, outs)
        records = self.get_many([k for k, _ in pairs])
        return [r is not None and self._decode_into(r, o) for r, (_, o) in zip(records, pairs, strict=True)]

    def __iter__(self) -> Iterator[bytes]:
        """The keys held now (a snapshot). Tiers that cannot list their keys raise TypeError."""
        raise TypeError(f"tier {self.name!r} cannot list its keys")

    def _check_put(self, key: bytes, record: BlockRecord) -> None:
        check_key(key)
        if not isinstance(record, BlockRecord):
            raise TypeError(f"put expects a BlockRecord, got {type(record).__name__}")
        if record.block_hash != key:
            raise ValueError(f"record holds block {record.block_hash.hex()[:16]}, not key {key.hex()[:16]}")
        if record.namespace != self.namespace:
            raise ValueError(
                f"record namespace {record.namespace.hex()[:16]} is not tier {self.name!r}'s "
                f"namespace {self.namespace.hex()[:16]}"
            )

    def _decode_into(self, record: BlockRecord, out: torch.Tensor) -> bool:
        """Decode a verified `record` into `out`; a payload that does not decode (a sound checksum over a writer's
        bad bytes) is dropped and counted like a corrupt block."""
        check_out(record.meta, record.block_hash, out)
        try:
            record.tensor(out=out)
        except CorruptBlockError as exc:
            LOGGER.warning("%s tier: dropping block %s: %s", self.name, record.block_hash.hex()[:16], exc)
            self.counters.add("corrupt_dropped")
            self.remove(record.block_hash)
            return False
        return True

    def _counters(self) -> dict[str, int]:
        values = dict.fromkeys(COUNTERS, 0)
        values.update(self.counters.snapshot())
        return values


def require_tensor(out: object) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor to decode the block into, got {type(out).__name__}")
    return out


def key_out_pairs(keys: Iterable[bytes], outs: Iterable[torch.Tensor]) -> list[tuple[bytes, torch.Tensor]]:
    keys, outs = list(keys), list(outs)
    if len(keys) != len(outs):
        raise ValueError(f"{len(keys)} keys for {len(outs)} output tensors; expected one tensor per key")
    for out in outs:
        require_tensor(out)
    return list(zip(keys, outs, strict=True))
