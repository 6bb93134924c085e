"""AutoScaler: exact lookahead allocations from predicted hit-rate curves, bounds, memory pressure, resizing
real CPU tiers, and a phase-changing workload where rescaling beats the fixed split."""

from __future__ import annotations

import hashlib

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.tier_controls import ResizableTier
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.engine.autoscaler import AutoScaler, ScaledTier
from ultra_adaptive_kv_cache_engine.engine.predictor import WorkloadPredictor
from ultra_adaptive_kv_cache_engine.tiers import BlockRecord, CPUTier, encode_block

NS = hashlib.sha256(b"autoscaler-tests").digest()
CODEC = make_codec("identity")


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FixedPressure:
    """A MemoryPressure whose answer the test sets."""

    def __init__(self, available: int) -> None:
        self.available = available

    def available_bytes(self) -> int:
        return self.available


def key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def record(name: str) -> BlockRecord:
    return encode_block(key(name), NS, torch.zeros(16), CODEC)


B = record("probe").nbytes  # one block, in bytes


def loops(clock: Clock, streams: dict[str, tuple[WorkloadPredictor, int]], accesses: int) -> None:
    """Each stream loops over its blocks of 128 bytes, `accesses` accesses per stream, one per clock second."""
    for n in range(accesses):
        for prefix, (predictor, blocks) in streams.items():
            predictor.observe_access(f"{prefix}{n % blocks}", 128)
        clock.now += 1.0


def scaled(name: str, predictor: WorkloadPredictor, low: int, high: int, capacity: int) -> ScaledTier:
    tier = CPUTier(NS, capacity, pin_memory=False, name=name)
    return ScaledTier(ResizableTier(tier), predictor, low, high)


def test_lookahead_finds_the_working_set_cliff_and_leaves_useless_memory_unallocated():
    clock = Clock()
    a, b = WorkloadPredictor(clock, half_life_s=None), WorkloadPredictor(clock, half_life_s=None)
    loops(clock, {"a": (a, 4), "b": (b, 2)}, 100)  # "a" needs 512 bytes (a cliff: nothing at 384), "b" 256
    scaler = AutoScaler(
        [scaled("A", a, 128, 1024, 512), scaled("B", b, 128, 1024, 512)], budget_bytes=1024, step_bytes=128
    )
    decision = scaler.plan()
    assert dict(decision.capacities) == {"A": 512, "B": 256}
    assert decision.unallocated_bytes == 256
    assert decision.budget_bytes == 1024
    expected = a.access_rate(10.0) * a.hit_rate(512) + b.access_rate(10.0) * b.hit_rate(256)
    assert decision.expected_hits_per_s == pytest.approx(expected)


def test_bounds_cap_the_grant():
    clock = Clock()
    a, b = WorkloadPredictor(clock, half_life_s=None), WorkloadPredictor(clock, half_life_s=None)
    loops(clock, {"a": (a, 4), "b": (b, 2)}, 100)
    scaler = AutoScaler(
        [scaled("A", a, 128, 384, 128), scaled("B", b, 128, 1024, 128)], budget_bytes=1024, step_bytes=128
    )
    assert dict(scaler.plan().capacities) == {"A": 128, "B": 256}  # A's cliff is above its max: no grant
    with pytest.raises(ValueError, match="below the sum"):
        AutoScaler([scaled("A", a, 600, 1024, 600), scaled("B", b, 600, 1024, 600)], 1000, 128)
    with pytest.raises(ValueError, match="distinct"):
        AutoScaler([scaled("A", a, 128, 1024, 128), scaled("A", b, 128, 1024, 128)], 1000, 128)
    with pytest.raises(ValueError, match="max_bytes"):
        scaled("A", a, 256, 128, 128)


def test_memory_pressure_shrinks_the_budget_but_never_below_the_minimums():
    clock = Clock()
    a = WorkloadPredictor(clock, half_life_s=None)
    loops(clock, {"a": (a, 4)}, 100)
    pressure = FixedPressure(available=-256)  # the machine is 256 bytes short
    scaler = AutoScaler([scaled("A", a, 128, 1024, 512)], budget_bytes=1024, step_bytes=128, pressure=pressure)
    assert scaler.effective_budget() == 256  # holds 512, gives back 256
    assert dict(scaler.plan().capacities) == {"A": 128}  # 256 does not reach the cliff at 512
    pressure.available = -10_000
    assert scaler.effective_budget() == 128
    pressure.available = 10_000
    assert scaler.effective_budget() == 1024


def test_step_resizes_real_tiers_shrinking_first():
    clock = Clock()
    a, b = (WorkloadPredictor(clock, half_life_s=None, unit_bytes=B) for _ in range(2))
    fast_a = CPUTier(NS, 6 * B, pin_memory=False, name="A")
    fast_b = CPUTier(NS, 2 * B, pin_memory=False, name="B")
    for i in range(6):
        fast_a.put(key(f"a{i}"), record(f"a{i}"))
    for _ in range(20):  # A's stream now loops over 2 blocks, B's over 5
        for i in range(2):
            a.observe_access(f"a{i}", B)
        for i in range(5):
            b.observe_access(f"b{i}", B)
    scaler = AutoScaler(
        [ScaledTier(ResizableTier(fast_a), a, B, 8 * B), ScaledTier(ResizableTier(fast_b), b, B, 8 * B)],
        budget_bytes=8 * B, step_bytes=B,
    )  # fmt: skip
    decision = scaler.step()
    assert dict(decision.capacities) == {"A": 2 * B, "B": 5 * B}
    assert decision.resized == ("A", "B")  # A shrinks before B grows
    assert (fast_a.capacity_bytes, fast_b.capacity_bytes) == (2 * B, 5 * B)
    assert fast_a.usage().used_bytes == 2 * B
    assert scaler.step().resized == ()  # already at target


def run_phases(autoscale: bool) -> int:
    """Two tenants share 12 blocks of memory. Phase 1: tenant A loops over 8 blocks, B over 3; phase 2 the other
    way round. Returns total hits of both real LRU tiers over the run."""
    clock = Clock()
    tiers = {n: CPUTier(NS, 6 * B, pin_memory=False, name=n) for n in "AB"}
    predictors = {n: WorkloadPredictor(clock, half_life_s=20.0, unit_bytes=B) for n in "AB"}
    scaler = AutoScaler(
        [ScaledTier(ResizableTier(tiers[n]), predictors[n], 2 * B, 10 * B) for n in "AB"],
        budget_bytes=12 * B, step_bytes=B,
    )  # fmt: skip
    hits = 0
    for phase, sizes in enumerate(({"A": 8, "B": 3}, {"A": 3, "B": 8})):
        for tick in range(100):
            clock.now = phase * 100 + tick
            for name, blocks in sizes.items():
                for i in range(blocks):
                    k = key(f"{name}{phase}-{i}")
                    predictors[name].observe_access(k, B)
                    if tiers[name].get(k) is not None:
                        hits += 1
                    else:
                        tiers[name].put(k, record(f"{name}{phase}-{i}"))
            if autoscale and tick % 10 == 9:
                scaler.step()
    return hits


def test_rescaling_under_a_phase_change_beats_the_fixed_split():
    fixed, scaled_hits = run_phases(False), run_phases(True)
    assert fixed == 2 * 99 * 3  # only the 3-block loop fits in a fixed half (6 blocks), after its cold round
    assert scaled_hits > fixed + 2 * 80 * 8  # the 8-block loop hits too for most of each phase
