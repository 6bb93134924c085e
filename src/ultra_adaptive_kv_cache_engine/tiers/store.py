"""`TieredStore`: tiers composed fastest first, itself a `Tier`.

- `get` looks from the fastest tier to the slowest; a hit in tier k is put into every faster tier (promotion),
  and what those puts evict is demoted.
- `put` stores into the fastest tier that accepts the record (a tier refuses when it is read-only, full of
  bigger-than-capacity records, or unreachable).
- Eviction from tier k demotes the evicted records into tier k+1 (skipping records tier k+1 already holds;
  a record tier k+1 refuses goes on to k+2); what falls off the last tier is dropped and counted.
- Write-through: a block `put` lands in a volatile tier (CPU) above durable ones is remembered as unsynced;
  `sync()` (called by a background thread, `cache/lower_tiers.py`, every `write_through_delay_s`) copies every
  unsynced block into EVERY durable or shared tier (disk, Redis), so other processes see it and kill -9 loses
  nothing `sync` has returned for (disk: in the page cache; fsynced too under `fsync_policy="always"`).
- `flush` is the persistence point: `sync()`, then every block held only by volatile tiers is copied into the
  first durable tier, then every tier flushes; the result lists the blocks made durable.

Each tier keeps its own capacity, eviction policy and counters (`usage().children`); the store counts
`hits`, `misses`, `promotions`, `demotions` and `dropped`. All tiers must share one namespace.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence

import torch

from .base import FlushResult, PutResult, Tier, TierUsage, key_out_pairs
from .record import BlockRecord, check_key


class TieredStore(Tier):
    """An ordered composition of tiers (fastest first) behind the same six methods."""

    kind = None

    def __init__(self, tiers: Sequence[Tier], promote: bool = True, name: str = "store") -> None:
        tiers = tuple(tiers)
        if not tiers or not all(isinstance(t, Tier) for t in tiers):
            raise ValueError(f"tiers={tiers!r} must be a non-empty sequence of Tier instances")
        namespaces = {t.namespace for t in tiers}
        if len(namespaces) != 1:
            raise ValueError(f"all tiers must share one namespace; got {sorted(n.hex()[:16] for n in namespaces)}")
        super().__init__(tiers[0].namespace, name)
        self.tiers = tiers
        self.promote = promote
        self._durable = tuple(i for i, t in enumerate(tiers) if t.durable)
        self._unsynced: dict[bytes, None] = {}
        self._sync_lock = threading.Lock()

    def contains(self, key: bytes) -> bool:
        check_key(key)
        return any(t.contains(key) for t in self.tiers)

    def get(self, key: bytes) -> BlockRecord | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        """One batched lookup per tier for the keys still missing; hits below tier 0 are promoted."""
        keys = [check_key(k) for k in keys]
        found: list[BlockRecord | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for level, tier in enumerate(self.tiers):
            if not missing:
                break
            records = tier.get_many([keys[i] for i in missing])
            still: list[int] = []
            for i, record in zip(missing, records, strict=True):
                if record is None:
                    still.append(i)
                    continue
                found[i] = record
                if level and self.promote:
                    self._promote(record, level)
            missing = still
        self.counters.add("hits", len(keys) - len(missing))
        self.counters.add("misses", len(missing))
        return found

    def get_into(self, key: bytes, out: torch.Tensor) -> bool:
        return self.get_many_into([key], [out])[0]

    def get_many_into(self, keys: Iterable[bytes], outs: Iterable[torch.Tensor]) -> list[bool]:
        """Decode each block into its `out`. With promotion a hit below tier 0 needs its record (to put it into
        the faster tiers), so this is `get_many` + decode; without, each tier's own `get_many_into` runs (a disk
        tier then reads straight into `out`)."""
        pairs = key_out_pairs(keys, outs)
        if self.promote:
            return super().get_many_into([k for k, _ in pairs], [o for _, o in pairs])
        found = [False] * len(pairs)
        missing = list(range(len(pairs)))
        for tier in self.tiers:
            if not missing:
                break
            hits = tier.get_many_into([pairs[i][0] for i in missing], [pairs[i][1] for i in missing])
            for i, hit in zip(missing, hits, strict=True):
                found[i] = hit
            missing = [i for i, hit in zip(missing, hits, strict=True) if not hit]
        self.counters.add("hits", len(pairs) - len(missing))
        self.counters.add("misses", len(missing))
        return found

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        self._check_put(key, record)
        reasons: list[str] = []
        for level, tier in enumerate(self.tiers):
            result = tier.put(key, record)
            self._demote(result.evicted, level + 1)
            if result.stored:
                if not tier.durable and any(i > level for i in self._durable):
                    with self._sync_lock:
                        self._unsynced[key] = None
                return PutResult(True)
            reasons.append(f"{tier.name}: {result.reason}")
        return PutResult(False, reason="; ".join(reasons))

    def remove(self, key: bytes) -> bool:
        check_key(key)
        removed = [t.remove(key) for t in self.tiers]
        return any(removed)

    def usage(self) -> TierUsage:
        children = tuple(t.usage() for t in self.tiers)
        caps = [c.capacity_bytes for c in children]
        used = [c.used_bytes for c in children]
        return TierUsage(
            self.name, None,
            None if None in caps else sum(c or 0 for c in caps),
            None if None in used else sum(u or 0 for u in used),
            None,
            read_only=all(c.read_only for c in children),
            healthy=all(c.healthy for c in children),
            last_error="; ".join(f"{c.name}: {c.last_error}" for c in children if c.last_error),
            counters=self.counters.snapshot(),
            children=children,
        )  # fmt: skip

    @property
    def unsynced(self) -> int:
        """Blocks put into a volatile tier that `sync` has not yet copied into the durable tiers."""
        return len(self._unsynced)

    def sync(self) -> int:
        """Copy every unsynced block into every durable tier (one batch per tier); returns the blocks copied.
        A block no tier holds any more is skipped (nothing to copy); a tier that refuses counts its refusal."""
        return len(self._sync())

    def _sync(self) -> dict[bytes, int]:
        """`sync`; the blocks stored by the first durable tier (key -> bytes)."""
        with self._sync_lock:
            keys, self._unsynced = list(self._unsynced), {}
        if not keys:
            return {}
        found: list[BlockRecord | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for tier in self.tiers:
            if not missing or tier.durable:
                break
            for i, record in zip(missing, tier.get_many([keys[i] for i in missing]), strict=True):
                found[i] = record
            missing = [i for i in missing if found[i] is None]
        items = [(r.block_hash, r) for r in found if r is not None]
        stored: dict[bytes, int] = {}
        for level in self._durable:
            results = self.tiers[level].put_many(items)
            for (key, record), result in zip(items, results, strict=True):
                self._demote(result.evicted, level + 1)
                if result.stored and level == self._durable[0]:
                    stored[key] = record.nbytes
            self.counters.add("synced", sum(r.stored for r in results))
        return stored

    def flush(self) -> FlushResult:
        """`sync`, copy volatile-only blocks into the first durable tier, flush every tier, report durable blocks."""
        written = self._sync()
        durable = next((i for i, t in enumerate(self.tiers) if t.durable), None)
        if durable is not None:
            target = self.tiers[durable]
            for tier in self.tiers[:durable]:
                for key in tier:
                    if target.contains(key):
                        continue
                    record = tier.get(key)
                    if record is None:
                        continue
                    result = target.put(key, record)
                    self._demote(result.evicted, durable + 1)
                    if result.stored:
                        written.setdefault(key, record.nbytes)
        for tier in self.tiers:
            result = tier.flush()
            for key, size in zip(result.keys, result.sizes, strict=True):
                written.setdefault(key, size)
        return FlushResult(tuple(written), tuple(written.values()))

    def __iter__(self) -> Iterator[bytes]:
        seen: dict[bytes, None] = {}
        for tier in self.tiers:
            try:
                seen.update(dict.fromkeys(tier))
            except TypeError:
                continue
        return iter(list(seen))

    def _promote(self, record: BlockRecord, level: int) -> None:
        for upper in range(level):
            result = self.tiers[upper].put(record.block_hash, record)
            if result.stored:
                self.counters.add("promotions")
            self._demote(result.evicted, upper + 1)

    def _demote(self, records: tuple[BlockRecord, ...], level: int) -> None:
        """Put each evicted record into tier `level` or the first slower tier that takes it."""
        for record in records:
            target = level
            while target < len(self.tiers):
                tier = self.tiers[target]
                if tier.contains(record.block_hash):
                    break
                result = tier.put(record.block_hash, record)
                self._demote(result.evicted, target + 1)
                if result.stored:
                    self.counters.add("demotions")
                    break
                target += 1
            else:
                self.counters.add("dropped")

