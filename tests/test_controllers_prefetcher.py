"""CachePrefetcher and the control adapters over real tiers: exact plans in tiny worlds, and a conversation
workload where prefetching the previous turn raises the fast tier's hit rate."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.tier_controls import (
    BlockSource,
    ResizableTier,
    StoreBlockSource,
    TierControl,
)
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.engine.controls import SystemMemoryPressure
from ultra_adaptive_kv_cache_engine.engine.prefetcher import CachePrefetcher
from ultra_adaptive_kv_cache_engine.tiers import (
    AsyncTransfer,
    BlockRecord,
    CPUTier,
    DiskTier,
    TieredStore,
    encode_block,
)

NS = hashlib.sha256(b"prefetcher-tests").digest()
CODEC = make_codec("identity")


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def record(name: str) -> BlockRecord:
    return encode_block(key(name), NS, torch.zeros(16), CODEC)


RECORD_BYTES = record("probe").nbytes


def store_of(fast_blocks: int, slow: CPUTier | DiskTier | None = None) -> TieredStore:
    fast = CPUTier(NS, fast_blocks * RECORD_BYTES, pin_memory=False, name="fast")
    if slow is None:
        slow = CPUTier(NS, 1000 * RECORD_BYTES, pin_memory=False, name="slow")
    return TieredStore([fast, slow])


def put(store: TieredStore, *names: str) -> None:
    for name in names:
        assert store.put(key(name), record(name)).stored


# -- adapters ----------------------------------------------------------------------------------------------
def test_store_block_source_reports_tiers_and_promotes_into_the_fastest(tmp_path: Path):
    disk = DiskTier(NS, tmp_path, 1000 * RECORD_BYTES, name="disk")
    store = store_of(2, disk)
    source = StoreBlockSource(store)
    assert isinstance(source, BlockSource)
    put(store, "a", "b", "c")  # "a" demoted to disk when "c" arrives
    assert [source.tier_of(key(n)) for n in ("a", "b", "c", "zz")] == ["disk", "fast", "fast", None]
    assert source.promote([key("a"), key("zz"), key("c")], "fast") == 1 and source.wait() == 0  # synchronous
    assert [source.tier_of(key(n)) for n in ("a", "b", "c")] == ["fast", "disk", "fast"]
    with pytest.raises(ValueError, match="fastest tier 'fast'"):
        source.promote([key("b")], "disk")


def test_store_block_source_promotes_in_the_background_through_an_async_transfer(tmp_path: Path):
    store = store_of(2, DiskTier(NS, tmp_path, 1000 * RECORD_BYTES, name="disk"))
    put(store, "a", "b", "c", "d")  # "a" and "b" on disk
    with AsyncTransfer(store) as transfer:
        source = StoreBlockSource(store, transfer)
        assert source.promote([key("a"), key("c")], "fast") == 1  # "c" is already fast: one queued
        assert source.wait(timeout=60) == 1  # the queued promotion found its block
        assert source.tier_of(key("a")) == "fast" and source.wait() == 0
    with AsyncTransfer(store) as other, pytest.raises(ValueError, match="target is this store"):
        StoreBlockSource(store_of(2), other)


def test_resizable_tier_shrinks_by_the_tiers_policy_and_spills_to_the_next_tier():
    tier = CPUTier(NS, 4 * RECORD_BYTES, pin_memory=False, name="fast")
    spill = CPUTier(NS, 10 * RECORD_BYTES, pin_memory=False, name="slow")
    control = ResizableTier(tier, spill)
    assert isinstance(control, TierControl)
    for name in ("a", "b", "c"):
        tier.put(key(name), record(name))
    assert control.resize(RECORD_BYTES) == 2
    assert list(tier) == [key("c")] and set(spill) == {key("a"), key("b")}
    assert tier.usage().capacity_bytes == RECORD_BYTES
    assert control.resize(8 * RECORD_BYTES) == 0
    assert tier.put(key("d"), record("d")).stored and len(tier) == 2
    with pytest.raises(ValueError, match="capacity_bytes=0"):
        control.resize(0)


class SelfResizingTier(CPUTier):
    """A CPU tier with its own `resize` (as tiers may grow one): the adapter must defer to it."""

    def resize(self, capacity_bytes: int) -> tuple[BlockRecord, ...]:
        self.capacity_bytes = capacity_bytes
        evicted = []
        while self.usage().used_bytes > capacity_bytes:
            victim = next(iter(self))
            evicted.append(self.get(victim))
            self.remove(victim)
        return tuple(evicted)


def test_resizable_tier_defers_to_the_tiers_own_resize():
    tier = SelfResizingTier(NS, 4 * RECORD_BYTES, pin_memory=False, name="fast")
    spill = CPUTier(NS, 10 * RECORD_BYTES, pin_memory=False, name="slow")
    for name in ("a", "b", "c"):
        tier.put(key(name), record(name))
    assert ResizableTier(tier, spill).resize(RECORD_BYTES) == 2
    assert len(tier) == 1 and set(spill) == {key("a"), key("b")}  # its own resize ran; what it evicted spilled


def test_system_memory_pressure_reads_mem_available(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    300 kB\n")
    assert SystemMemoryPressure(reserve_bytes=100 * 1024, meminfo=meminfo).available_bytes() == 200 * 1024
    assert SystemMemoryPressure().available_bytes() > 0  # this machine's /proc/meminfo
    with pytest.raises(ValueError, match="reserve_bytes"):
        SystemMemoryPressure(reserve_bytes=-1)


# -- prefetcher ----------------------------------------------------------------------------------------------
def test_plan_promotes_a_conversation_due_within_the_lookahead():
    clock = Clock()
    store = store_of(3)
    source = StoreBlockSource(store)
    prefetcher = CachePrefetcher(source, "fast", clock, lookahead_s=5.0, max_blocks=8)
    put(store, "x1", "x2")
    prefetcher.on_request("x", [key("x1"), key("x2")])
    clock.now = 10.0
    put(store, "x3")
    prefetcher.on_request("x", [key("x1"), key("x2"), key("x3")])  # gap 10 s: next turn expected at 20
    put(store, "o1", "o2", "o3")  # other traffic pushes x's blocks to the slow tier
    assert [source.tier_of(key(n)) for n in ("x1", "x2", "x3")] == ["slow"] * 3
    clock.now = 12.0
    assert prefetcher.plan() == ((), ())
    assert [(c.conversation_id, c.expected_at) for c in prefetcher.candidates()] == [("x", 20.0)]
    clock.now = 16.0
    result = prefetcher.step()
    assert (result.planned, result.promoted, result.conversations) == (3, 3, ("x",))
    assert [source.tier_of(key(n)) for n in ("x1", "x2", "x3")] == ["fast"] * 3
    assert prefetcher.step().planned == 0  # already in the fast tier: nothing more to do
    put(store, "o4", "o5", "o6")
    store.remove(key("x2"))
    assert prefetcher.plan() == ((key("x1"),), ("x",))  # x3 is useless without its parent x2


def test_ranking_budget_expiry_and_end():
    clock = Clock()
    store = store_of(1)
    source = StoreBlockSource(store)
    prefetcher = CachePrefetcher(source, "fast", clock, lookahead_s=100.0, max_blocks=3, live_timeout_s=50.0)
    put(store, "a1", "a2", "b1", "b2", "c1", "pad")
    prefetcher.on_request("a", [key("a1"), key("a2")])
    clock.now = 4.0
    prefetcher.on_request("a", [key("a1"), key("a2")])  # gap 4: "a" due at 8
    prefetcher.on_request("b", [key("b1"), key("b2")])  # first turn: the global gap (4): due at 8
    clock.now = 5.0
    prefetcher.on_request("c", [key("c1")])  # due at 9
    assert [c.conversation_id for c in prefetcher.candidates()] == ["a", "b", "c"]
    keys, conversations = prefetcher.plan()
    assert keys == (key("a1"), key("a2"), key("b1")) and conversations == ("a", "b")  # at most 3 blocks
    clock.now = 12.5  # "a" and "b" (due at 8) overdue by more than their gap (4 s): presumed idle
    assert prefetcher.plan() == ((key("c1"),), ("c",))
    assert prefetcher.end("c") and not prefetcher.end("c")
    clock.now = 100.0  # past the live timeout
    assert prefetcher.candidates() == [] and prefetcher.live == 0
    with pytest.raises(ValueError, match="conversation_id"):
        prefetcher.on_request("", [])


def simulate_conversations(prefetch: bool) -> tuple[int, int]:
    """6 conversations, a turn each every 12 s (staggered by 2 s), one new block per turn; the fast tier holds 8
    blocks (less than two conversations), so plain LRU always evicts the conversation that comes next.
    Returns (fast-tier hits, lookups) of the blocks each turn reuses."""
    clock = Clock()
    store = store_of(8)
    source = StoreBlockSource(store)
    prefetcher = CachePrefetcher(source, "fast", clock, lookahead_s=1.5, max_blocks=8)
    chains: dict[str, list[str]] = {f"c{i}": [] for i in range(6)}
    hits = lookups = 0
    for second in range(0, 12 * 6):
        clock.now = float(second)
        if prefetch:
            prefetcher.step()
        if second % 2:
            continue
        cid = f"c{(second // 2) % 6}"
        chain = chains[cid]
        for name in chain:
            lookups += 1
            hits += source.tier_of(key(name)) == "fast"
        store.get_many([key(n) for n in chain])
        chain.append(f"{cid}-{len(chain)}")
        put(store, chain[-1])
        prefetcher.on_request(cid, [key(n) for n in chain])
    return hits, lookups


def test_prefetching_the_previous_turn_beats_lru_alone():
    hits_without, lookups = simulate_conversations(prefetch=False)
    hits_with, lookups_with = simulate_conversations(prefetch=True)
    assert lookups == lookups_with == 6 * (0 + 1 + 2 + 3 + 4 + 5)
    assert hits_without == 3  # only in the first round, while every chain still fits
    assert hits_with == lookups  # every reused block was already in the fast tier
