"""`TierLink`: the part of `KVCacheManager` that links the pool to the tiers below it (`LowerTiers`).

- Promotion: `new_sequence` continues a prefix match that left the pool into the tiers (`_promote`): the next
  blocks' names are hashed run by run (`_hash_runs`), fetched, loaded into newly allocated pool blocks and
  indexed, so a later request finds them in the pool.
- Eviction: when the pool hands a named block out again (`_on_evict`) its name leaves the index and, if the
  tiers take blocks on eviction, a snapshot goes down to them; `evict_blocks` forgets names everywhere.
- The tiers' façade for the engine, the controllers and persistence: `persist`, `durable_blocks`,
  `set_load_planner`, `close`, `usage`, `tier_controls`, `block_record_bytes`, `block_source`.
Same lock, same pool and index as the rest of the manager (this is a part of its class, in a file of its own).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..prefix import hash_block
from ..tiers import BlockRecord, FlushResult
from .lower_tiers import LoadObserver, LoadPlanner
from .manager_state import ManagerState
from .results import PrefixMatch
from .tier_controls import BlockSource, TierControl

if TYPE_CHECKING:
    from ..memory import EvictedBlock


class TierLink(ManagerState):
    """Promotion from, eviction to and the façade of the tiers below the pool; mixed into `KVCacheManager`."""

    def _promote(self, tokens: list[int], match: PrefixMatch, max_blocks: int) -> PrefixMatch:
        """Continues `match` (blocks already pinned) with the leading run of the next blocks found in the lower
        tiers, decoded into newly allocated (pinned) pool blocks and indexed. The run is fetched and loaded in
        runs of `LowerTiers.fetch_runs` (on CUDA each run's copies are queued before the next run is looked
        up, so the host's lookups and bookkeeping overlap the copies of the runs before it)."""
        assert self.lower is not None
        bs, first = self.block_size, len(match.block_ids)
        runs = self._hash_runs(tokens, match.hashes[-1] if match.hashes else None, first, max_blocks)
        if self.lower.planner is not None or self.lower.observer is not None:  # they see every name first
            wanted = self.lower.choose([h for run in runs for h in run], first, len(tokens))
            runs = iter([wanted[i : i + self.lower.promotion_run] for i in range(0, len(wanted), self.lower.promotion_run)])
        started = time.perf_counter()
        loaded: list[BlockRecord] = []
        new_ids: list[int] = []
        for run in self.lower.fetch_runs(runs):
            records = run[: self.pool.num_free]
            block_ids = self.pool.allocate_many(len(records)) if records else None
            if not block_ids:
                break
            try:
                self.lower.load(self.pool.kv, block_ids, records)
            except ValueError as exc:  # a record of another shape or dtype: never served
                self.logger.warning("lower-tier blocks not loaded: %s", exc)
                self.pool.free(block_ids)
                break
            for block_id, record in zip(block_ids, records, strict=True):
                if self.index.insert(record.block_hash, block_id):
                    self.pool.set_block_hash(block_id, record.block_hash)
            loaded += records
            new_ids += block_ids
            if len(records) < len(run):
                break
        if not loaded:
            return match
        self.counters.add("tier_hit_tokens", len(loaded) * bs)
        self.lower.report(loaded, time.perf_counter() - started)
        return PrefixMatch(match.block_ids + tuple(new_ids), match.hashes + tuple(r.block_hash for r in loaded),
                           (len(match.block_ids) + len(loaded)) * bs)

    def _hash_runs(self, tokens: list[int], parent: bytes | None, first: int, stop: int) -> Iterator[list[bytes]]:
        """The names of blocks [first, stop) of `tokens` after `parent`, `promotion_run` at a time, each run
        hashed only when it is asked for (the first copies start after one run's hashing, not all of it)."""
        assert self.lower is not None
        bs, step = self.block_size, self.lower.promotion_run
        for start in range(first, stop, step):
            run: list[bytes] = []
            for i in range(start, min(start + step, stop)):
                parent = hash_block(parent, tokens[i * bs : (i + 1) * bs], self.namespace)
                run.append(parent)
            yield run

    def evict_blocks(self, hashes: Sequence[bytes]) -> int:
        """Forgets the blocks named `hashes` everywhere: unnamed in the pool (a held block stays with its sequences,
        never found again) and removed from every tier below (`LowerTiers.evict`); returns the pool blocks unnamed."""
        with self._lock:
            dropped = [b for b in map(self.index.remove, hashes) if b is not None]
            for block_id in dropped:
                self.pool.clear_block_hash(block_id)
        if self.lower is not None:
            self.lower.evict(hashes)
        return len(dropped)

    def persist(self) -> FlushResult | None:
        """Makes every committed block durable in the lower tiers; None when there are none."""
        return self.lower.flush() if self.lower is not None else None

    def durable_blocks(self) -> int:
        """Blocks the durable tiers (disk) hold now: what a restart warm-starts from."""
        return self.lower.durable_blocks() if self.lower is not None else 0

    def set_load_planner(self, planner: LoadPlanner | None, observer: LoadObserver | None = None) -> None:
        """Compute or load: `planner` decides per request how many blocks found below the pool to load (the rest
        is recomputed); `observer` is told what each promotion moved and how long it took. No-op without tiers."""
        if self.lower is not None:
            self.lower.planner, self.lower.observer = planner, observer

    def close(self) -> FlushResult | None:
        """Waits for queued tier writes and stops the writer threads (idempotent); None without tiers."""
        return self.lower.close() if self.lower is not None else None

    def usage(self) -> Any:
        """The tiers' `TierUsage` tree, or None without tiers."""
        return self.lower.usage() if self.lower is not None else None

    def tier_controls(self) -> list[TierControl]:
        """What the autoscaler resizes: one control per resizable tier, fastest first."""
        return self.lower.tier_controls() if self.lower is not None else []

    def block_record_bytes(self) -> int:
        """What one block takes in the tiers (its record under the write codec; the pool's bytes without tiers)."""
        return self.lower.record_bytes(self.spec) if self.lower is not None else self.spec.bytes_per_block

    def block_source(self) -> BlockSource | None:
        """What the prefetcher promotes through (in the write-through thread), or None without tiers."""
        return self.lower.block_source() if self.lower is not None else None

    def _on_evict(self, evicted: EvictedBlock) -> None:
        """The pool hands a named block out again: its name leaves the index and, when the tiers take blocks on
        eviction (`LowerTiers.write_on_evict`) and none holds it yet, a snapshot goes down to them. The snapshot
        is taken now, on the pool's stream, so whatever overwrites the block later runs after it."""
        block_hash, block_id = evicted.block_hash, evicted.block_id
        if self.index.get(block_hash) != block_id:
            return
        self.index.remove(block_hash)
        lower = self.lower
        if lower is not None and lower.write_on_evict and not lower.store.contains(block_hash):
            lower.write([block_hash], self.pool.kv[block_id : block_id + 1].clone())
            self.counters.add("evicted_written_blocks")
