"""AdvancedMetricsCollector: exact counters, gaps, lifetimes, TTFT histograms, and Prometheus-shaped samples."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ultra_adaptive_kv_cache_engine.engine.metrics_collector import AdvancedMetricsCollector, Histogram
from ultra_adaptive_kv_cache_engine.tiers import CPUTier

NS = hashlib.sha256(b"metrics-tests").digest()


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def exposition(samples) -> str:
    """The Prometheus text format of the samples (what an exporter would write)."""
    lines = []
    for name, labels, value in samples:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
        lines.append(f"{name}{{{inner}}} {value!r}" if labels else f"{name} {value!r}")
    return "\n".join(lines) + "\n"


def test_histogram_is_cumulative_with_inf_last():
    h = Histogram((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 3.0):
        h.observe(v)
    assert h.cumulative() == [("1.0", 2), ("2.0", 3), ("+Inf", 4)]
    assert (h.count, h.sum) == (4, 6.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((2.0, 1.0))
    with pytest.raises(ValueError, match="non-negative"):
        h.observe(-1.0)


def test_hit_rates_gaps_and_lifetimes_in_a_tiny_world():
    clock = Clock()
    m = AdvancedMetricsCollector(clock, gap_buckets_s=(1.0, 10.0), lifetime_buckets_s=(5.0, 50.0))
    m.record_insert("a", "cpu")
    m.record_lookup("a", "cpu")
    clock.now = 4.0
    m.record_lookup("a", "cpu")  # gap 4 s
    m.record_lookup("b", None)
    clock.now = 4.5
    m.record_lookup("b", "disk")  # gap 0.5 s
    clock.now = 20.0
    assert m.record_evict("a", "cpu") == 20.0
    assert m.record_evict("zz", "cpu") is None  # insert never seen: counted, no lifetime
    assert m.hit_rates() == {"cpu": 0.5, "disk": 0.25, "miss": 0.25}
    snap = m.snapshot()
    assert snap["lookups"] == {"cpu": 2, "disk": 1, "miss": 1}
    assert snap["evictions"] == {"cpu": 2}
    assert snap["reuse_gap_s"] == {"buckets": {"1.0": 1, "10.0": 2, "+Inf": 2}, "count": 2, "sum": 4.5}
    assert snap["block_lifetime_s"] == {"cpu": {"buckets": {"5.0": 0, "50.0": 1, "+Inf": 1}, "count": 1, "sum": 20.0}}


def test_ttft_and_token_counts():
    m = AdvancedMetricsCollector(Clock(), ttft_buckets_s=(0.1, 1.0))
    m.record_ttft(0.05, prompt_tokens=100, cached_tokens=64)
    m.record_ttft(2.0, prompt_tokens=50)
    snap = m.snapshot()
    assert snap["ttft_s"] == {"buckets": {"0.1": 1, "1.0": 1, "+Inf": 2}, "count": 2, "sum": 2.05}
    assert (snap["prompt_tokens"], snap["cached_tokens"]) == (150, 64)
    with pytest.raises(ValueError, match="cached <= prompt"):
        m.record_ttft(0.1, prompt_tokens=4, cached_tokens=8)


def test_prometheus_samples_of_a_tiny_world_parse_as_the_text_format():
    clock = Clock()
    m = AdvancedMetricsCollector(clock, ttft_buckets_s=(1.0,), gap_buckets_s=(1.0,), lifetime_buckets_s=(1.0,))
    tier = CPUTier(NS, 4096, pin_memory=False, name="cpu")
    m.record_insert("a", "cpu")
    m.record_lookup("a", "cpu")
    clock.now = 0.5
    m.record_lookup("a", "cpu")
    m.record_evict("a", "cpu")
    m.record_ttft(0.25, 10, 5)
    m.record_tier_usage(tier.usage())
    samples = list(m.prometheus_samples())
    assert samples == [
        ("uakv_block_lookups_total", {"tier": "cpu"}, 2.0),
        ("uakv_hit_rate", {"tier": "cpu"}, 1.0),
        ("uakv_block_inserts_total", {"tier": "cpu"}, 1.0),
        ("uakv_block_evictions_total", {"tier": "cpu"}, 1.0),
        ("uakv_prompt_tokens_total", {}, 10.0),
        ("uakv_cached_tokens_total", {}, 5.0),
        ("uakv_ttft_seconds_bucket", {"le": "1.0"}, 1.0),
        ("uakv_ttft_seconds_bucket", {"le": "+Inf"}, 1.0),
        ("uakv_ttft_seconds_sum", {}, 0.25),
        ("uakv_ttft_seconds_count", {}, 1.0),
        ("uakv_reuse_gap_seconds_bucket", {"le": "1.0"}, 1.0),
        ("uakv_reuse_gap_seconds_bucket", {"le": "+Inf"}, 1.0),
        ("uakv_reuse_gap_seconds_sum", {}, 0.5),
        ("uakv_reuse_gap_seconds_count", {}, 1.0),
        ("uakv_block_lifetime_seconds_bucket", {"tier": "cpu", "le": "1.0"}, 1.0),
        ("uakv_block_lifetime_seconds_bucket", {"tier": "cpu", "le": "+Inf"}, 1.0),
        ("uakv_block_lifetime_seconds_sum", {"tier": "cpu"}, 0.5),
        ("uakv_block_lifetime_seconds_count", {"tier": "cpu"}, 1.0),
        ("uakv_tier_capacity_bytes", {"tier": "cpu"}, 4096.0),
        ("uakv_tier_used_bytes", {"tier": "cpu"}, 0.0),
        ("uakv_tier_blocks", {"tier": "cpu"}, 0.0),
    ]
    parsed = [(s.name, s.labels, s.value) for f in text_string_to_metric_families(exposition(samples)) for s in f.samples]
    assert parsed == samples  # every name, label and value survives the Prometheus text format


def test_bounded_tracking_forgets_the_oldest_block():
    clock = Clock()
    m = AdvancedMetricsCollector(clock, max_blocks=1)
    m.record_lookup("a", "cpu")
    m.record_lookup("b", "cpu")  # "a" forgotten
    clock.now = 1.0
    m.record_lookup("a", "cpu")
    assert m.reuse_gaps.count == 0
    with pytest.raises(ValueError, match="max_blocks"):
        AdvancedMetricsCollector(max_blocks=0)
