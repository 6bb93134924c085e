"""`Controllers` over real tiers: each switch turns its controller off, the prefetcher promotes the conversation
that is due, the autoscaler resizes the real tiers within their bounds (spilling down), metrics see every
request, the background thread runs rounds and stops; `conversation_key` names conversations."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.tier_controls import block_source, tier_controls
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.controllers import (
    Controllers,
    ControllerSettings,
    conversation_key,
)
from ultra_adaptive_kv_cache_engine.tiers import BlockRecord, CPUTier, DiskTier, TieredStore, encode_block

NS = hashlib.sha256(b"controllers-live-tests").digest()
CODEC = make_codec("identity")
OFF = {"enable_prefetcher": False, "enable_autoscaler": False, "enable_metrics": False}


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FixedPressure:
    def __init__(self, available: int) -> None:
        self.available = available

    def available_bytes(self) -> int:
        return self.available


def key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def record(name: str) -> BlockRecord:
    return encode_block(key(name), NS, torch.zeros(16), CODEC)


B = record("probe").nbytes


def world(tmp_path: Path, cpu_blocks: int, disk_blocks: int) -> tuple[CPUTier, DiskTier, TieredStore]:
    cpu = CPUTier(NS, cpu_blocks * B, pin_memory=False, name="cpu")
    disk = DiskTier(NS, tmp_path, disk_blocks * B, fsync="never", io_threads=1, name="disk")
    return cpu, disk, TieredStore([cpu, disk])


def controllers(store: TieredStore, clock: Clock, pressure: int = 10**12, **switches: object) -> Controllers:
    config = KVCacheConfig(**{**OFF, **switches})
    settings = ControllerSettings(min_requests=4, lookahead_s=3.0)
    return Controllers(config, tier_controls(store), block_source(store), B, clock, settings, FixedPressure(pressure))


def test_each_switch_turns_its_controller_off(tmp_path: Path) -> None:
    _, _, store = world(tmp_path, 4, 8)
    off = controllers(store, Clock())
    assert (off.predictor, off.prefetcher, off.autoscalers, off.metrics, off.enabled) == (None, None, (), None, False)
    assert off.step().prefetch is None and off.step().scaling == ()
    off.on_request("c", [key("a")], ["cpu"], 0.1, 16, 16)  # nothing to tell: still fine
    stats = off.stats()
    assert (stats["predictor"], stats["prefetcher"], stats["autoscaler"], stats["metrics"]) == (None,) * 4
    assert stats["requests"] == 1 and stats["rounds"] == 2
    prefetch = controllers(store, Clock(), enable_prefetcher=True)
    assert prefetch.prefetcher is not None and prefetch.predictor is not None and not prefetch.autoscalers
    scale = controllers(store, Clock(), enable_autoscaler=True)
    assert scale.prefetcher is None and [len(s.tiers) for s in scale.autoscalers] == [1, 1]  # memory, disk
    metrics = controllers(store, Clock(), enable_metrics=True)
    assert metrics.metrics is not None and metrics.predictor is None
    config = KVCacheConfig(**{**OFF, "enable_prefetcher": True, "enable_autoscaler": True})
    nothing = Controllers(config, [], None, B, Clock())  # no tiers to act on: nothing to build
    assert nothing.prefetcher is None and nothing.autoscalers == () and not nothing.enabled


def test_prefetcher_promotes_the_conversation_whose_turn_is_due(tmp_path: Path) -> None:
    cpu, disk, store = world(tmp_path, 2, 16)
    clock = Clock()
    c = controllers(store, clock, enable_prefetcher=True, enable_metrics=True)
    for name in ("a", "b", "c", "x", "y"):
        store.put(key(name), record(name))  # x, y last: a, b, c were demoted to the disk tier
    assert [c.source.tier_of(key(n)) for n in "abcxy"] == ["disk"] * 3 + ["cpu"] * 2
    c.on_request("conv", [key("a"), key("b")], [None, None], 0.5, 32, 0)
    clock.now = 10.0
    c.on_request("conv", [key("a"), key("b"), key("c")], ["disk", "disk", None], 0.2, 48, 32)
    clock.now = 15.0  # next turn expected at 20: beyond the 3 s lookahead
    assert c.step().prefetch.promoted == 0  # type: ignore[union-attr]
    clock.now = 18.0
    done = c.step().prefetch
    assert done is not None and done.conversations == ("conv",) and done.promoted == 1  # fast_share: 1 of 2 blocks
    assert c.source.tier_of(key("a")) == "cpu" and c.source.tier_of(key("b")) == "disk"
    stats = c.stats()
    assert stats["prefetcher"] == {"live_conversations": 1, "promoted_blocks": 1, "skipped_rounds": 0}
    assert stats["metrics"]["prefetched_blocks"] == 1
    assert stats["metrics"]["lookups"] == {"disk": 2, "miss": 3}
    assert stats["metrics"]["tiers"]["cpu"] == {"capacity_bytes": 2 * B, "used_bytes": 2 * B, "blocks": 2}


def test_no_prefix_reuse_means_no_prefetch(tmp_path: Path) -> None:
    _, _, store = world(tmp_path, 2, 16)
    clock = Clock()
    c = controllers(store, clock, enable_prefetcher=True)
    for t in range(3):
        clock.now = 10.0 * t
        c.on_request("conv", [key(f"new{t}")], [None], None, 16, 0)  # every turn starts afresh
    clock.now = 28.0
    assert c.step().prefetch is None and c.stats()["prefetcher"]["skipped_rounds"] == 1


def hot_loop(c: Controllers, clock: Clock, blocks: int, requests: int) -> None:
    """`requests` requests, one per second, each reading the same `blocks` blocks in prefix order."""
    for _ in range(requests):
        clock.now += 1.0
        c.on_request(None, [key(f"h{i}") for i in range(blocks)], ["cpu"] * blocks, None, 16 * blocks, 0)


def test_autoscaler_shrinks_to_what_buys_hits_spilling_down(tmp_path: Path) -> None:
    cpu, disk, store = world(tmp_path, 128, 256)
    for i in range(40):
        store.put(key(f"x{i}"), record(f"x{i}"))
    clock = Clock()
    c = controllers(store, clock, enable_autoscaler=True)
    hot_loop(c, clock, 8, 3)
    assert c.step().scaling == ()  # 3 requests < min_requests: warming up, nothing resized
    hot_loop(c, clock, 8, 5)
    decisions = c.step().scaling
    assert [d.resized for d in decisions] == [("cpu",), ("disk",)]
    # An 8-block working set: no capacity beyond it buys a hit, so each tier goes down to its floor (1/8).
    assert (cpu.usage().capacity_bytes, disk.usage().capacity_bytes) == (16 * B, 32 * B)
    assert (len(cpu), len(disk)) == (16, 24) and set(cpu) | set(disk) == {key(f"x{i}") for i in range(40)}
    assert list(cpu) == [key(f"x{i}") for i in range(24, 40)]  # lru: the 24 oldest spilled to disk
    assert c.stats()["autoscaler"]["tiers"]["cpu"] == {"capacity_bytes": 16 * B, "min_bytes": 16 * B,
                                                       "max_bytes": 128 * B}


@pytest.mark.parametrize("short_blocks, capacity_blocks", [(0, 48), (88, 16)])
def test_autoscaler_fits_the_working_set_unless_memory_is_short(tmp_path: Path, short_blocks: int,
                                                                 capacity_blocks: int) -> None:
    cpu, disk, store = world(tmp_path, 128, 256)
    clock = Clock()
    c = controllers(store, clock, pressure=-short_blocks * B, enable_autoscaler=True)
    hot_loop(c, clock, 48, 6)  # a 48-block loop: LRU hits only once all 48 fit
    c.step()
    # Enough memory: exactly the working set. 88 blocks short: 128 - 88 = 40 blocks would buy no hit at all,
    # so the tier goes down to its floor and the rest is given back.
    assert cpu.usage().capacity_bytes == capacity_blocks * B
    assert disk.usage().capacity_bytes == 32 * B  # the disk's budget is its own: no use beyond the CPU tier


def test_a_lull_in_traffic_does_not_shrink_the_tiers(tmp_path: Path) -> None:
    cpu, _, store = world(tmp_path, 128, 256)
    clock = Clock()
    c = controllers(store, clock, enable_autoscaler=True)
    hot_loop(c, clock, 48, 6)
    c.step()
    clock.now += 300.0  # five minutes without a request: the forecast sees no accesses at all...
    assert c.predictor is not None and c.predictor.access_rate(10.0) == 0.0
    c.step()
    assert cpu.usage().capacity_bytes == 48 * B  # ...but the curve still says 48 blocks buy hits


def test_background_thread_runs_rounds_and_stops(tmp_path: Path) -> None:
    _, _, store = world(tmp_path, 4, 8)
    config = KVCacheConfig(**{**OFF, "enable_metrics": True, "controller_interval_s": 0.001})
    c = Controllers(config, tier_controls(store), block_source(store), B)
    ran = threading.Event()
    original = c.step

    def step():
        result = original()
        if c.counters.get("rounds") >= 3:
            ran.set()
        return result

    c.step = step  # type: ignore[method-assign]
    c.start()
    c.start()  # idempotent
    assert ran.wait(timeout=60) and c.stats()["running"]
    c.stop()
    assert not c.stats()["running"] and c.stats()["errors"] == 0
    c.stop()  # idempotent


def test_a_failing_round_is_counted_and_the_thread_goes_on(tmp_path: Path) -> None:
    _, _, store = world(tmp_path, 4, 8)
    config = KVCacheConfig(**{**OFF, "enable_metrics": True, "controller_interval_s": 0.001})
    c = Controllers(config, tier_controls(store), block_source(store), B)
    failed = threading.Event()

    def step():
        if c.counters.get("errors") >= 2:
            failed.set()
        raise RuntimeError("boom")

    c.step = step  # type: ignore[method-assign]
    c.start()
    assert failed.wait(timeout=60)
    c.stop()
    assert c.stats()["errors"] >= 2


def test_requests_must_name_a_tier_per_block(tmp_path: Path) -> None:
    _, _, store = world(tmp_path, 4, 8)
    c = controllers(store, Clock(), enable_metrics=True)
    with pytest.raises(ValueError, match="2 block hashes for 1 hit tiers"):
        c.on_request(None, [key("a"), key("b")], ["cpu"], None, 32, 0)
    with pytest.raises(ValueError, match="block_bytes=0"):
        Controllers(KVCacheConfig(), [], None, 0)
    with pytest.raises(ValueError, match="fast_share=0"):
        ControllerSettings(fast_share=0)


def test_conversation_key() -> None:
    system = {"role": "system", "content": "be brief"}
    first = [system, {"role": "user", "content": "hi"}]
    later = [*first, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    assert conversation_key({"messages": first}) == conversation_key({"messages": later})
    assert conversation_key({"messages": first}).startswith("messages:")  # type: ignore[union-attr]
    assert conversation_key({"messages": [system, {"role": "user", "content": "other"}]}) != conversation_key(
        {"messages": first})
    assert conversation_key({"messages": later, "conversation_id": "c1", "user": "u"}) == "conversation_id:c1"
    assert conversation_key({"messages": later, "user": "u"}) == "user:u"
    assert conversation_key({"text": "a prompt"}) is None
    assert conversation_key({"messages": []}) is None
