"""WorkloadPredictor and its parts: exact stack distances, hit-rate curves checked against a real LRU tier,
prefix reuse, and rate forecasts in tiny worlds with an injected clock."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.engine.predictor import RateSeries, WorkloadPredictor
from ultra_adaptive_kv_cache_engine.engine.reuse_distance import (
    DecayedHistogram,
    ReuseDistanceTracker,
    bucket_edge,
    bucket_of,
)
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, encode_block

NS = hashlib.sha256(b"predictor-tests").digest()


class Clock:
    """A settable clock (seconds)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def naive_distance(history: list[tuple[str, int]], key: str) -> int | None:
    """Bytes of distinct other keys since the last access of `key` (each at its latest size)."""
    seen: dict[str, int] = {}
    for k, size in reversed(history):
        if k == key:
            return sum(seen.values())
        seen.setdefault(k, size)
    return None


def test_stack_distances_in_a_tiny_world():
    tracker = ReuseDistanceTracker()
    assert [tracker.access(k, s) for k, s in [("a", 100), ("b", 50), ("c", 25)]] == [None, None, None]
    assert tracker.access("a", 100) == 75  # b + c
    assert tracker.access("b", 50) == 125  # c + a
    assert tracker.access("b", 50) == 0
    assert tracker.access("c", 25) == 150  # a + b
    assert len(tracker) == 3


def test_stack_distances_match_the_naive_definition_across_compactions():
    rng = random.Random(7)
    tracker = ReuseDistanceTracker()
    history: list[tuple[str, int]] = []
    sizes = {f"k{i}": rng.randint(1, 9) for i in range(60)}
    for _ in range(3000):  # more accesses than the initial 1024-slot axis: compaction runs
        key = f"k{min(59, int(rng.expovariate(0.08)))}"
        assert tracker.access(key, sizes[key]) == naive_distance(history, key)
        history.append((key, sizes[key]))


def test_tracker_forgets_the_least_recent_key_beyond_max_keys():
    tracker = ReuseDistanceTracker(max_keys=2)
    for key in ("a", "b", "c"):
        tracker.access(key, 10)
    assert len(tracker) == 2
    assert tracker.access("a", 10) is None  # forgotten: counts as cold
    assert tracker.access("c", 10) == 10  # only "a" (b was forgotten when a came back)


def test_buckets_are_exact_up_to_1024_units_and_edges_bound_them_above():
    assert [bucket_of(r) for r in (0, 1, 1024)] == [0, 1, 1024]
    for r in range(1, 200_000, 7):
        b = bucket_of(r)
        assert bucket_edge(b) >= r
        assert bucket_edge(b - 1) < r
        assert bucket_edge(b) <= r * 1.011 + 1


def test_hit_rate_curve_of_a_loop():
    clock = Clock()
    predictor = WorkloadPredictor(clock, half_life_s=None)
    for _ in range(3):
        for key in ("a", "b", "c"):
            predictor.observe_access(key, 100)
    # 3 cold accesses, 6 needing 300 bytes (two other blocks of 100 + itself)
    assert predictor.hit_rate(300) == pytest.approx(6 / 9)
    assert predictor.hit_rate(299) == 0.0
    assert predictor.hit_rate_curve([100, 300, 10**9]) == pytest.approx((0.0, 6 / 9, 6 / 9))
    assert predictor.cold_fraction() == pytest.approx(3 / 9)
    assert predictor.reuse_distances() == ((300, 1.0),)


def test_unit_bytes_makes_the_curve_exact_in_whole_blocks():
    predictor = WorkloadPredictor(Clock(), half_life_s=None, unit_bytes=1000)
    for _ in range(2):
        for key in ("a", "b"):
            predictor.observe_access(key, 1000)
    assert predictor.hit_rate_curve([1999, 2000]) == (0.0, 0.5)
    assert predictor.reuse_distances() == ((2000, 1.0),)


def test_predicted_hit_rate_equals_a_real_lru_tier_at_bucket_edges():
    rng = random.Random(3)
    codec = make_codec("identity")
    records = {}
    for i in range(40):
        key = hashlib.sha256(f"block{i}".encode()).digest()
        records[key] = encode_block(key, NS, torch.zeros(rng.randint(8, 64)), codec)
    keys = list(records)
    stream = [keys[min(39, int(rng.expovariate(0.1)))] for _ in range(1500)]
    predictor = WorkloadPredictor(Clock(), half_life_s=None)
    for key in stream:
        predictor.observe_access(key, records[key].nbytes)
    for capacity in (bucket_edge(bucket_of(c)) for c in (600, 1500, 2500, 4000)):
        tier = CPUTier(NS, capacity, policy="lru", pin_memory=False)
        hits = 0
        for key in stream:
            if tier.get(key) is not None:
                hits += 1
            else:
                tier.put(key, records[key])
        assert predictor.hit_rate(capacity) == pytest.approx(hits / len(stream))


def test_decay_lets_a_new_phase_dominate():
    clock = Clock()
    predictor = WorkloadPredictor(clock, half_life_s=10.0)
    for _ in range(50):  # phase 1: a loop over 2 blocks of 100 bytes
        for key in ("a", "b"):
            predictor.observe_access(key, 100)
    clock.now = 100.0  # ten half-lives later, phase 2: a loop over 4 blocks
    for _ in range(20):
        for key in ("w", "x", "y", "z"):
            predictor.observe_access(key, 100)
    assert predictor.hit_rate(200) < 0.01
    assert predictor.hit_rate(400) > 0.9


def test_decayed_histogram_halves_weights_per_half_life_and_renormalises_keeping_ratios():
    hist = DecayedHistogram(half_life_s=1.0)
    hist.add(100, 0.0)
    hist.add(None, 1.0)  # weighs twice the first
    assert hist.hit_rate(10**6) == pytest.approx(1 / 3)
    hist = DecayedHistogram(half_life_s=1.0)
    hist.add(100, 513.0)  # exponent > 512: the scale is renormalised here
    hist.add(None, 514.0)
    assert hist.hit_rate(10**6) == pytest.approx(1 / 3)
    assert hist.distribution() == ((100, 1.0),)


def test_prefix_reuse_of_requests():
    predictor = WorkloadPredictor(Clock(), half_life_s=None)
    first = predictor.observe_request(["a", "b", "c"], 10)
    second = predictor.observe_request(["a", "b", "d"], [10, 10, 10])
    assert (first.reused_blocks, first.total_blocks) == (0, 3)
    assert (second.reused_blocks, second.distances) == (2, (20, 20, None))
    reuse = predictor.prefix_reuse()
    assert reuse.mean == pytest.approx(1 / 3)
    assert reuse.histogram[0] == pytest.approx(0.5)
    assert reuse.histogram[6] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 sizes for 3 keys"):
        predictor.observe_request(["a", "b", "c"], [1, 2])


def test_forecast_follows_a_ramp_where_the_last_interval_lags():
    clock = Clock()
    predictor = WorkloadPredictor(clock, interval_s=1.0, alpha=1.0, beta=1.0)
    for second, count in enumerate((1, 2, 3, 4)):
        clock.now = second + 0.1
        for _ in range(count):
            predictor.observe_request(["x"], 1)
    clock.now = 4.0
    forecast = predictor.forecast(horizon_s=2.0)
    # level 4, trend +1 per interval: the next two intervals average 5.5 requests
    assert forecast.request_rate == pytest.approx(5.5)
    assert forecast.expected_requests == pytest.approx(11.0)
    assert forecast.access_rate == pytest.approx(5.5)
    assert predictor.request_rate() == pytest.approx(5.0)


def test_rate_series_counts_silent_intervals_and_resets_after_a_long_gap():
    series = RateSeries(1.0, alpha=1.0, beta=1.0, max_gap=5)
    series.add(0.5, 4)
    series.advance(3.0)  # closes [0,1) with 4, then [1,2) and [2,3) empty
    assert series.level == 0.0
    series.add(100.0)
    assert (series.level, series.trend) == (0.0, 0.0)
    with pytest.raises(ValueError, match="interval_s"):
        RateSeries(0.0, 0.5, 0.5)
    with pytest.raises(ValueError, match="horizon_s"):
        WorkloadPredictor(Clock()).forecast(0.0)
