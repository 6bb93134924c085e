"""AdvancedMetricsCollector: exact counters, gaps, lifetimes, TTFT histograms, as real prometheus_client metrics
whose text exposition parses back to the exact values."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ultra_adaptive_kv_cache_engine.engine.metrics_collector import AdvancedMetricsCollector
from ultra_adaptive_kv_cache_engine.tiers import CPUTier

NS = hashlib.sha256(b"metrics-tests").digest()


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def parsed(collector: AdvancedMetricsCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition (but `_created`, a wall-clock time) as {(name, sorted labels): value}."""
    text = collector.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.name.endswith("_created")
    }


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
    assert snap["inserts"] == {"cpu": 1} and snap["evictions"] == {"cpu": 2}
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
    with pytest.raises(ValueError, match="seconds=-1"):
        m.record_ttft(-1, prompt_tokens=4)
    with pytest.raises(ValueError, match="strictly increasing"):
        AdvancedMetricsCollector(ttft_buckets_s=(2.0, 1.0))


def test_a_request_counts_blocks_per_tier_and_tokens():
    clock = Clock()
    m = AdvancedMetricsCollector(clock, ttft_buckets_s=(0.1, 1.0), gap_buckets_s=(1.0,))
    m.record_request(["a", "b", "c", "d"], ["pool", "pool", "cpu", None], 0.05, prompt_tokens=70, cached_tokens=48)
    clock.now = 0.5
    m.record_request(["a", "b", "c", "d", "e"], ["pool", "cpu", "cpu", "cpu", None], None, 80, 64)
    snap = m.snapshot()
    assert snap["lookups"] == {"cpu": 4, "miss": 2, "pool": 3}
    assert (snap["prompt_tokens"], snap["cached_tokens"]) == (150, 112)
    assert snap["ttft_s"]["count"] == 1  # the second request had no TTFT
    assert snap["reuse_gap_s"] == {"buckets": {"1.0": 4, "+Inf": 4}, "count": 4, "sum": 2.0}
    with pytest.raises(ValueError, match="one tier per key"):
        m.record_request(["a"], [], None, 1, 0)


def test_exposition_parses_to_the_exact_values():
    clock = Clock()
    m = AdvancedMetricsCollector(clock, ttft_buckets_s=(1.0,), gap_buckets_s=(1.0,), lifetime_buckets_s=(1.0,))
    tier = CPUTier(NS, 4096, pin_memory=False, name="cpu")
    m.record_insert("a", "cpu")
    m.record_request(["a", "b"], ["cpu", None], 0.25, prompt_tokens=10, cached_tokens=5)
    clock.now = 0.5
    m.record_lookup("a", "cpu")
    m.record_evict("a", "cpu")
    m.record_tier_usage(tier.usage())
    m.record_prefetch(3)
    cpu = (("tier", "cpu"),)
    assert parsed(m) == {
        ("uakv:prefix_cache_queries_total", ()): 10.0,
        ("uakv:prefix_cache_hits_total", ()): 5.0,
        ("uakv:block_hits_total", cpu): 2.0,
        ("uakv:block_misses_total", ()): 1.0,
        ("uakv:block_inserts_total", cpu): 1.0,
        ("uakv:block_evictions_total", cpu): 1.0,
        ("uakv:prefetched_blocks_total", ()): 3.0,
        ("uakv:time_to_first_token_seconds_bucket", (("le", "1.0"),)): 1.0,
        ("uakv:time_to_first_token_seconds_bucket", (("le", "+Inf"),)): 1.0,
        ("uakv:time_to_first_token_seconds_count", ()): 1.0,
        ("uakv:time_to_first_token_seconds_sum", ()): 0.25,
        ("uakv:block_reuse_gap_seconds_bucket", (("le", "1.0"),)): 1.0,
        ("uakv:block_reuse_gap_seconds_bucket", (("le", "+Inf"),)): 1.0,
        ("uakv:block_reuse_gap_seconds_count", ()): 1.0,
        ("uakv:block_reuse_gap_seconds_sum", ()): 0.5,
        ("uakv:block_lifetime_seconds_bucket", (("le", "1.0"), ("tier", "cpu"))): 1.0,
        ("uakv:block_lifetime_seconds_bucket", (("le", "+Inf"), ("tier", "cpu"))): 1.0,
        ("uakv:block_lifetime_seconds_count", cpu): 1.0,
        ("uakv:block_lifetime_seconds_sum", cpu): 0.5,
        ("uakv:tier_capacity_bytes", cpu): 4096.0,
        ("uakv:tier_used_bytes", cpu): 0.0,
        ("uakv:tier_blocks", cpu): 0.0,
    }
    families = {f.name: f.type for f in text_string_to_metric_families(m.exposition().decode())}
    assert families["uakv:prefix_cache_queries"] == "counter"
    assert families["uakv:time_to_first_token_seconds"] == "histogram"
    assert families["uakv:tier_capacity_bytes"] == "gauge"
    assert m.snapshot()["tiers"] == {"cpu": {"capacity_bytes": 4096, "used_bytes": 0, "blocks": 0}}


def test_two_collectors_never_share_a_series():
    a, b = AdvancedMetricsCollector(Clock()), AdvancedMetricsCollector(Clock())
    a.record_lookup("k", "cpu")
    assert a.snapshot()["lookups"] == {"cpu": 1} and b.snapshot()["lookups"] == {}
    assert a.registry is not b.registry


def test_bounded_tracking_forgets_the_oldest_block():
    clock = Clock()
    m = AdvancedMetricsCollector(clock, max_blocks=1)
    m.record_lookup("a", "cpu")
    m.record_lookup("b", "cpu")  # "a" forgotten
    clock.now = 1.0
    m.record_lookup("a", "cpu")
    assert m.snapshot()["reuse_gap_s"]["count"] == 0
    with pytest.raises(ValueError, match="max_blocks"):
        AdvancedMetricsCollector(max_blocks=0)
