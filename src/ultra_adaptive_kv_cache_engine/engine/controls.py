"""The small interfaces the adaptive controllers act through, and adapters of the real tiers to them.

Controllers never reach into a tier: they read what these Protocols expose and act through them, so each one
is tested against real tiers (through the adapters below) or a tiny real implementation in a test.

- `TierControl`: a tier whose capacity can be changed (`AutoScaler`).
- `BlockSource`: where a block lives now, and promotion to a faster tier (`CachePrefetcher`).
- `HitRateModel`: a predicted hit-rate curve and access rate (`WorkloadPredictor` is one).
- `MemoryPressure`: how many bytes the machine can still give (`AutoScaler`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from ..tiers import AsyncTransfer, BlockRecord, Tier, TieredStore, TierUsage
from ..tiers.record import check_key


@runtime_checkable
class TierControl(Protocol):
    """A tier that can be resized. `resize` evicts (and reports how many blocks) when it shrinks."""

    name: str

    def usage(self) -> TierUsage: ...

    def resize(self, capacity_bytes: int) -> int: ...


@runtime_checkable
class BlockSource(Protocol):
    """Where blocks live (`tier_of`: the fastest tier holding `key`, None if none) and promotion to `tier`."""

    def tier_of(self, key: bytes) -> str | None: ...

    def promote(self, keys: Sequence[bytes], tier: str) -> int: ...


@runtime_checkable
class HitRateModel(Protocol):
    """A predicted hit rate for an LRU cache of `capacity_bytes`, and the block accesses per second expected."""

    def hit_rate(self, capacity_bytes: int) -> float: ...

    def access_rate(self, horizon_s: float) -> float: ...


@runtime_checkable
class MemoryPressure(Protocol):
    """Bytes the machine can still give (negative: it is short by that much)."""

    def available_bytes(self) -> int: ...


def _require_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class ResizableTier:
    """`TierControl` over a real tier with a `capacity_bytes` attribute (CPUTier, DiskTier).

    Growing sets the capacity. Shrinking sets it, then removes blocks until `used_bytes <= capacity_bytes`
    (the tier's own `resize` is used instead when it has one, returning the evicted records or their count).
    The fallback removes blocks in the tier's listing order (oldest inserted first). Each evicted record is
    put into `spill` (the next tier) when given, so nothing cached is lost by a shrink a slower tier can hold.
    Invariant after `resize(c)`: the tier's capacity is `c` and it holds at most `c` bytes.
    """

    def __init__(self, tier: Tier, spill: Tier | None = None) -> None:
        if not isinstance(tier, Tier) or not hasattr(tier, "capacity_bytes"):
            raise TypeError(f"tier must be a Tier with a capacity_bytes attribute, got {type(tier).__name__}")
        self.tier = tier
        self.spill = spill
        self.name = tier.name

    def usage(self) -> TierUsage:
        return self.tier.usage()

    def resize(self, capacity_bytes: int) -> int:
        """Set the capacity; returns the number of blocks removed to fit it."""
        _require_positive("capacity_bytes", capacity_bytes)
        own = getattr(self.tier, "resize", None)
        if callable(own):
            evicted = own(capacity_bytes)
            if isinstance(evicted, int):
                return evicted
            for record in evicted:  # the records it evicted, as `put` reports them: spill them too
                self._spill(record)
            return len(evicted)
        self.tier.capacity_bytes = capacity_bytes  # type: ignore[attr-defined]
        removed = 0
        for key in self.tier:
            if (self.tier.usage().used_bytes or 0) <= capacity_bytes:
                break
            record = self.tier.get(key) if self.spill is not None else None
            if self.tier.remove(key):
                removed += 1
            if record is not None:
                self._spill(record)
        return removed

    def _spill(self, record: BlockRecord) -> None:
        if self.spill is not None and not self.spill.contains(record.block_hash):
            self.spill.put(record.block_hash, record)


class StoreBlockSource:
    """`BlockSource` over a `TieredStore`: tiers are named by their `name`; promotion goes to the fastest.

    `promote(keys, tier)` reads each key not already in the fastest tier through the store, which puts it
    into every faster tier and demotes what that evicts (so nothing is lost); keys no tier holds are skipped.
    With `transfer` (an `AsyncTransfer` over the same store) the reads run in its background thread, off the
    caller's path: `promote` returns at once with the number of keys queued.
    """

    def __init__(self, store: TieredStore, transfer: AsyncTransfer | None = None) -> None:
        if not isinstance(store, TieredStore):
            raise TypeError(f"store must be a TieredStore, got {type(store).__name__}")
        if transfer is not None and transfer.target is not store:
            raise ValueError("transfer must be an AsyncTransfer whose target is this store")
        self.store = store
        self.transfer = transfer

    @property
    def fast_tier(self) -> str:
        return self.store.tiers[0].name

    def tier_of(self, key: bytes) -> str | None:
        check_key(key)
        return next((t.name for t in self.store.tiers if t.contains(key)), None)

    def promote(self, keys: Sequence[bytes], tier: str) -> int:
        """Promote `keys` into the fastest tier (`tier` must name it); returns how many were promoted
        (or queued, with a transfer)."""
        if tier != self.fast_tier:
            raise ValueError(f"tier={tier!r}: this store promotes into its fastest tier {self.fast_tier!r} only")
        fast = self.store.tiers[0]
        wanted = [k for k in dict.fromkeys(check_key(k) for k in keys) if not fast.contains(k)]
        present = [k for k in wanted if self.tier_of(k) is not None]
        if not present:
            return 0
        if self.transfer is not None:
            self.transfer.prefetch(present)
            return len(present)
        self.store.get_many(present)
        return sum(fast.contains(k) for k in present)


class SystemMemoryPressure:
    """`MemoryPressure` of this machine: MemAvailable (Linux) less `reserve_bytes` kept for everything else.

    Where /proc/meminfo is missing, free physical pages (os.sysconf) stand in for available memory.
    """

    def __init__(self, reserve_bytes: int = 0, meminfo: str | os.PathLike[str] = "/proc/meminfo") -> None:
        if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
            raise ValueError(f"reserve_bytes={reserve_bytes!r} must be a non-negative integer")
        self.reserve_bytes = reserve_bytes
        self.meminfo = Path(meminfo)

    def available_bytes(self) -> int:
        return self._available() - self.reserve_bytes

    def _available(self) -> int:
        try:
            for line in self.meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
