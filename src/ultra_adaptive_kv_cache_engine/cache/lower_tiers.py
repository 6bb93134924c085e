"""`LowerTiers`: the tiers below the block pool, as the paged cache sees them.

- Writes (`config.tier_writes`): with `write_on_evict` a block goes down when the pool evicts it (a snapshot
  taken before the pool hands the block out again), so nothing is copied while the pool has room; otherwise
  (write-through) every block committed to the prefix index is snapshotted (one gather of the batch) and
  written in the background to the tiered store (the tiers of `config.tier_list`, fastest first: by default
  CPU memory, then disk when persistence is on, then Redis/Valkey when configured). A background thread
  (`uakv-write-through`) calls the store's `sync()` every `write_through_delay_s` seconds, so every committed
  block reaches EVERY durable or shared tier within about that delay (plus the write queue's backlog): other
  processes sharing Redis see it, and a kill -9 or a restart finds it on disk.
- Promotion: a prefix lookup that runs out of pool blocks continues the hash chain in the store; the leading
  run found there is loaded into fresh pool blocks and indexed, as if it had been computed here.
- Persistence: `flush()` waits for queued writes and makes them durable (the store's flush).

Invariant: only blocks whose hash chain is complete from the root are ever written, so a block found in a
tier can always be used once its parents are.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..compression import Codec
from ..config import KVCacheConfig
from ..kernels.pinned_hold import PinnedHold
from ..memory import KVSpec
from ..metrics import LOGGER_NAME
from ..tiers import AsyncTransfer, BlockRecord, FlushResult, Tier, TieredStore, load_records
from ..tiers.block_io import LoadResult
from ..types import TierKind, TierWrites
from .tier_controls import BlockSource, TierControl, block_source, record_bytes, tier_controls
from .tier_list import build_tiers

LoadPlanner = Callable[[int, Sequence[str], int], int]
"""(blocks already in the pool, tier of each next block found below it (a leading run), prompt tokens) ->
how many of those next blocks to load; the rest of the prompt is recomputed."""

LoadObserver = Callable[[Mapping[str, int], float], None]
"""(bytes loaded per tier, seconds the fetch and load took) after every promotion."""

PROMOTION_RUN = 32
"""Blocks looked up and loaded per piece of a promotion (`fetch_runs`): small enough that the first copies start
after a few blocks' host work (a 16k-token prefix is 1,024 blocks of 16 tokens), large enough that a piece's
fixed costs (a side stream, an event, one lookup per tier) stay small next to its copies."""

LOCAL_TIER_KINDS = frozenset({TierKind.DEVICE, TierKind.CPU, TierKind.DISK})
"""Tiers of this machine (`local_keys`); the others (Redis) are shared by the fleet."""


class LowerTiers:
    """Write-through, promotion and persistence between a block pool and a tiered store.

    `planner` (optional) decides compute-or-load per request (e.g. `PerformanceOptimizer.plan`); without one,
    every block found is loaded. `observer` (optional) is told what each promotion moved and how long it took.
    """

    def __init__(self, store: Tier, codec: Codec, max_pending: int = 1024,
                 write_through_delay_s: float | None = None, write_on_evict: bool = False) -> None:
        self.store = store
        self.codec = codec
        self.write_on_evict = write_on_evict
        """True: the cache writes a block when its pool evicts it; False: at its commit (write-through)."""
        self.planner: LoadPlanner | None = None
        self.observer: LoadObserver | None = None
        self._located: list[str] = []
        self.promotion_run = PROMOTION_RUN
        self.mapped_reads = True
        """On CUDA, promoted page-locked blocks are read by one kernel per run (`kernels.triton_host_copy`)."""
        self._hold: PinnedHold | None = None
        self.transfer = AsyncTransfer(store, max_pending=max_pending)
        self._stop_sync = threading.Event()
        self._syncer: threading.Thread | None = None
        if write_through_delay_s is not None and isinstance(store, TieredStore) and any(t.durable for t in store.tiers):
            self._syncer = threading.Thread(target=_sync_loop, args=(store, self._stop_sync, write_through_delay_s),
                                            name="uakv-write-through", daemon=True)
            self._syncer.start()
        # At interpreter exit, finish queued writes before the writer threads die mid-copy.
        self._finalizer = weakref.finalize(self, _close, self._stop_sync, self._syncer, self.transfer)

    @classmethod
    def from_config(cls, config: KVCacheConfig, namespace_digest: bytes) -> LowerTiers | None:
        """The tiers of `config.tier_list` under `namespace_digest` (see `tier_list`), or None when there are none."""
        tiers, codec = build_tiers(config, namespace_digest)
        if not tiers or codec is None:
            return None
        return cls(TieredStore(tiers), codec, write_through_delay_s=config.write_through_delay_s,
                   write_on_evict=_writes_on_evict(config.tier_writes, tiers))

    def write(self, hashes: Sequence[bytes], blocks: torch.Tensor) -> int:
        """Queue `blocks[i]` (a snapshot the caller gives away) under `hashes[i]`; returns how many queued."""
        if not hashes:
            return 0
        return self.transfer.put_blocks(list(hashes), blocks, self.codec, copy=False)

    def fetch_chain(self, hashes: Sequence[bytes]) -> list[BlockRecord]:
        """Records of the leading run of `hashes` that the store holds (stops at the first miss)."""
        if not hashes:
            return []
        found: list[BlockRecord] = []
        for record in self.store.get_many(list(hashes)):
            if record is None:
                break
            found.append(record)
        return found

    def fetch_runs(self, runs: Iterable[Sequence[bytes]]) -> Iterator[list[BlockRecord]]:
        """`fetch_chain` of each run of names in turn (callers cut them `promotion_run` long): the records of the
        leading part the store holds, nothing after the first miss. The caller loads each run's records before
        asking for the next, so on CUDA the copies of one run go on while the next is named and looked up."""
        for run in runs:
            found = self.fetch_chain(run)
            if found:
                yield found
            if len(found) < len(run):
                return

    def locate(self, hashes: Sequence[bytes]) -> list[str]:
        """The tier name holding each of the leading run of `hashes` that some tier holds (no data is read)."""
        tiers = getattr(self.store, "tiers", (self.store,))
        found: list[str] = []
        for key in hashes:
            tier = next((t for t in tiers if t.contains(key)), None)
            if tier is None:
                break
            found.append(tier.name)
        return found

    def choose(self, hashes: Sequence[bytes], pool_blocks: int, prompt_tokens: int) -> list[bytes]:
        """The leading part of `hashes` worth loading: the planner's choice, or every block a tier holds.
        Remembers where the chosen blocks are for `report` (callers hold the cache's lock)."""
        if self.planner is None and self.observer is None:
            return list(hashes)
        located = self.locate(hashes)
        if self.planner is not None and located:
            located = located[: max(0, min(len(located), self.planner(pool_blocks, located, prompt_tokens)))]
        self._located = located
        return list(hashes[: len(located)])

    @property
    def located(self) -> tuple[str, ...]:
        """The tier holding each block of the last `choose` (empty when no planner or observer asked to locate)."""
        return tuple(self._located)

    def report(self, records: Sequence[BlockRecord], seconds: float) -> None:
        """Tells the observer what a promotion moved (bytes per tier that held each block) and how long it took."""
        if self.observer is None or not records:
            return
        moved: dict[str, int] = {}
        for tier, record in zip(self._located, records, strict=False):
            moved[tier] = moved.get(tier, 0) + record.nbytes
        self.observer(moved, seconds)

    def load(self, pool_kv: torch.Tensor, block_ids: Sequence[int], records: Sequence[BlockRecord]) -> LoadResult:
        """`records` into pool_kv[block_ids] (`tiers.load_records`: a pinning CPU tier's identity-coded blocks
        are read straight from their page-locked payloads, by one kernel per call on CUDA when `mapped_reads`
        (else one DMA per block), the rest decoded first); says how many went which way."""
        hold = None
        if self.mapped_reads and pool_kv.device.type == "cuda":
            hold = self._hold = self._hold or PinnedHold()
        return load_records(pool_kv, block_ids, records, hold)

    def flush(self) -> FlushResult:
        """Wait for queued writes, then make everything durable that the store's tiers can make durable."""
        return self.transfer.flush()

    def close(self) -> FlushResult:
        result = _close(self._stop_sync, self._syncer, self.transfer)
        self._finalizer.detach()
        return result

    def usage(self) -> Any:
        return self.store.usage()

    def durable_blocks(self) -> int:
        """Blocks the disk tiers hold now."""
        usage = self.store.usage()
        return sum(c.num_blocks or 0 for c in (usage.children or (usage,)) if c.kind == TierKind.DISK)

    def tier_controls(self) -> list[TierControl]:
        """One control per resizable tier, fastest first (`tier_controls.tier_controls`)."""
        return tier_controls(self.store) if isinstance(self.store, TieredStore) else []

    def record_bytes(self, spec: KVSpec) -> int:
        """Bytes one block of `spec` takes in a tier under the write codec."""
        return record_bytes(self.store.namespace, spec.block_shape, spec.storage_dtype, self.codec)

    def evict(self, hashes: Sequence[bytes]) -> int:
        """Removes the blocks named `hashes` from every tier, once the queued writes have landed (so none of them
        comes back); returns how many some tier held. A tier that fails is logged (its copy stays until evicted)."""
        log = logging.getLogger(LOGGER_NAME)
        try:
            self.transfer.flush()
        except Exception:  # a tier that cannot flush must not stop the removal from the others
            log.exception("flush before eviction failed")
        removed = 0
        for key in hashes:
            try:
                removed += bool(self.store.remove(key))
            except Exception:
                log.exception("removing block %s from the tiers failed", key.hex()[:16])
        return removed

    def local_keys(self) -> tuple[bytes, ...]:
        """The keys the tiers of this machine hold now (`LOCAL_TIER_KINDS`: memory, disk; never a shared tier such
        as Redis, whose listing would scan every instance's blocks). A tier that cannot list its keys is skipped."""
        keys: dict[bytes, None] = {}
        for tier in getattr(self.store, "tiers", (self.store,)):
            if tier.kind in LOCAL_TIER_KINDS:
                try:
                    keys.update(dict.fromkeys(tier))
                except TypeError:
                    continue
        return tuple(keys)

    def block_source(self) -> BlockSource | None:
        """Promotion into the fastest tier through the write-through thread (None for a single bare tier)."""
        return block_source(self.store, self.transfer) if isinstance(self.store, TieredStore) else None


def _writes_on_evict(writes: TierWrites | str, tiers: Sequence[Tier]) -> bool:
    """`config.tier_writes` for these tiers: AUTO writes on eviction only when no tier is durable or shared."""
    mode = TierWrites(writes)
    if mode is TierWrites.AUTO:
        return not any(t.durable or t.kind not in LOCAL_TIER_KINDS for t in tiers)
    return mode is TierWrites.EVICT


def _sync_loop(store: TieredStore, stop: threading.Event, delay_s: float) -> None:
    """Every `delay_s` seconds until `stop`: copy newly committed blocks into every durable tier."""
    while not stop.wait(delay_s):
        try:
            store.sync()
        except Exception:  # the thread must outlive any one failure; tiers count their own errors
            logging.getLogger(LOGGER_NAME).exception("write-through sync failed")


def _close(stop: threading.Event, syncer: threading.Thread | None, transfer: AsyncTransfer) -> FlushResult:
    stop.set()
    if syncer is not None:
        syncer.join()
    return transfer.close()
