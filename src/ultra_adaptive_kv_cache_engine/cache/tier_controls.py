"""What the adaptive controllers may do to the tiers below the pool, and adapters of the real tiers to it.

Controllers (L4) never reach into a tier: the cache manager hands them these objects, built here from its
`TieredStore` and `AsyncTransfer` by `tier_controls(store)` and `block_source(store, transfer)`.

- `TierControl`: a tier whose capacity can be changed (the autoscaler); `ResizableTier` is one over a real tier.
- `BlockSource`: where a block lives now, and promotion into the fastest tier (the prefetcher);
  `StoreBlockSource` is one over a `TieredStore`.
- `record_bytes`: what one block takes in a tier (the controllers' unit).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol, runtime_checkable

import torch

from ..compression import Codec
from ..tiers import AsyncTransfer, BlockRecord, Tier, TieredStore, TierUsage, encode_block
from ..tiers.record import check_key


@runtime_checkable
class TierControl(Protocol):
    """A tier that can be resized. `resize` evicts (and reports how many blocks) when it shrinks."""

    name: str

    def usage(self) -> TierUsage: ...

    def resize(self, capacity_bytes: int) -> int: ...


@runtime_checkable
class BlockSource(Protocol):
    """Where blocks live (`tier_of`: the fastest tier holding `key`, None if none) and promotion to `tier`
    (`fast_tier`: the name of the tier promotions go to)."""

    @property
    def fast_tier(self) -> str: ...

    def tier_of(self, key: bytes) -> str | None: ...

    def promote(self, keys: Sequence[bytes], tier: str) -> int: ...


def _require_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return value


class ResizableTier:
    """`TierControl` over a real tier with a `capacity_bytes` attribute (CPUTier, DiskTier, SegmentDiskTier).

    The tier's own `resize` is used when it has one: it evicts the victims its policy names, in the policy's
    order, and returns the records it evicted. A tier without one gets the fallback: set the capacity, then
    remove blocks in the tier's listing order until `used_bytes <= capacity_bytes`. Each evicted record is put
    into `spill` (the slower tiers, e.g. a `TieredStore` of them, which demotes on down) when given, so nothing
    cached is lost by a shrink that a slower tier can hold.
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
            before = self.tier.usage().num_blocks or 0
            for record in own(capacity_bytes):  # the records it evicted, as `put` reports them: spill them
                self._spill(record)
            return max(0, before - (self.tier.usage().num_blocks or 0))
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
        self._lock = threading.Lock()
        self._queued: list[Future[int]] = []

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
            future = self.transfer.prefetch(present)
            with self._lock:
                self._queued = [f for f in self._queued if not f.done()] + [future]
            return len(present)
        self.store.get_many(present)
        return sum(fast.contains(k) for k in present)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the promotions queued in the transfer's background thread so far; returns how many of their
        blocks were found (0 without a transfer: promotion was synchronous). TimeoutError past `timeout`."""
        with self._lock:
            queued, self._queued = self._queued, []
        return sum(f.result(timeout) for f in queued)


def tier_controls(store: TieredStore) -> list[ResizableTier]:
    """One `ResizableTier` per tier of `store` that can resize (has `resize`; a Redis tier cannot), fastest
    first, each spilling what a shrink evicts into the slower tiers (a `TieredStore` of them, which demotes
    on down); the last tier spills nowhere."""
    if not isinstance(store, TieredStore):
        raise TypeError(f"store must be a TieredStore, got {type(store).__name__}")
    tiers = store.tiers
    controls: list[ResizableTier] = []
    for i, tier in enumerate(tiers):
        if not callable(getattr(tier, "resize", None)):
            continue
        below = tiers[i + 1 :]
        spill = None if not below else below[0] if len(below) == 1 else TieredStore(below, name=f"below-{tier.name}")
        controls.append(ResizableTier(tier, spill))
    return controls


def block_source(store: TieredStore, transfer: AsyncTransfer | None = None) -> StoreBlockSource:
    """The `BlockSource` of `store`: promotions run in `transfer`'s background thread when given (it must
    target `store`), synchronously otherwise."""
    return StoreBlockSource(store, transfer)


def record_bytes(namespace: bytes, block_shape: Sequence[int], dtype: torch.dtype, codec: Codec) -> int:
    """Bytes one block of `block_shape` and `dtype` takes in a tier when encoded with `codec`: the size of the
    record of a seeded random block (exact for identity and the fixed-size quantisers; an estimate for zstd,
    whose size depends on the content)."""
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(tuple(block_shape), generator=generator).to(dtype)
    return encode_block(bytes(32), namespace, block, codec).nbytes
