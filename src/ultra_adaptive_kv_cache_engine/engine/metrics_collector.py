"""`AdvancedMetricsCollector`: prefix-cache hits per tier, TTFT, reuse gaps, block lifetimes, tier usage, as
real Prometheus metrics.

It is told of events (a request's blocks and where each was found, its time to first token and token counts,
a block inserted into or evicted from a tier, a tier's usage, blocks prefetched) and keeps them in
`prometheus_client` Counters, Gauges and Histograms registered in a `CollectorRegistry` of its own (one per
collector, so two engines or two tests never share a series). Names follow vLLM's (`vllm:prefix_cache_queries`
becomes `uakv:prefix_cache_queries_total`): tokens queried and hit, blocks hit per tier (`tier` label: `pool`,
`cpu`, `disk`, ...), blocks missed, the TTFT histogram, tier capacity/usage gauges. Read-outs: `exposition()`
(the text format a /metrics endpoint serves), `snapshot()` (the same values as a JSON-able dict), `hit_rates()`.
Thread-safe (prometheus_client's metrics are; the gap and lifetime trackers hold one lock); the clock is
injected and only times gaps and lifetimes.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter as Tally
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from ..policies.base import Clock
from ..tiers import TierUsage

PREFIX = "uakv:"
MISS = "miss"
"""The key of lookups that no tier answered, in `hit_rates()` and `snapshot()["lookups"]`."""

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GAP_BUCKETS_S = (0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
LIFETIME_BUCKETS_S = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)


def _buckets(name: str, bounds: Sequence[float]) -> tuple[float, ...]:
    bounds = tuple(float(b) for b in bounds)
    if not bounds or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
        raise ValueError(f"{name}={bounds!r} must be non-empty and strictly increasing")
    return bounds


def _seconds(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a finite non-negative number of seconds")
    return float(value)


class AdvancedMetricsCollector:
    """Collects cache metrics into `self.registry`; see the module docstring. `max_blocks` bounds the blocks
    tracked for gaps and lifetimes (the least recently seen is forgotten first)."""

    def __init__(
        self,
        clock: Clock | None = None,
        ttft_buckets_s: Sequence[float] = TTFT_BUCKETS_S,
        gap_buckets_s: Sequence[float] = GAP_BUCKETS_S,
        lifetime_buckets_s: Sequence[float] = LIFETIME_BUCKETS_S,
        max_blocks: int = 1_000_000,
    ) -> None:
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks!r} must be a positive integer")
        self.clock = clock or time.monotonic
        self.max_blocks = max_blocks
        self.registry = CollectorRegistry()
        r, p = self.registry, PREFIX
        self.queries = Counter(f"{p}prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", registry=r)
        self.hits = Counter(f"{p}prefix_cache_hits", "Prompt tokens whose KV was reused (pool or a tier).", registry=r)
        self.block_hits = Counter(f"{p}block_hits", "Blocks found, by the place that held them.", ["tier"], registry=r)
        self.block_misses = Counter(f"{p}block_misses", "Blocks looked up that no place held.", registry=r)
        self.inserts = Counter(f"{p}block_inserts", "Blocks that entered a tier.", ["tier"], registry=r)
        self.evictions = Counter(f"{p}block_evictions", "Blocks that left a tier.", ["tier"], registry=r)
        self.prefetched = Counter(f"{p}prefetched_blocks", "Blocks promoted ahead of their request.", registry=r)
        self.ttft = Histogram(f"{p}time_to_first_token_seconds", "Time to first token of a request.",
                              buckets=_buckets("ttft_buckets_s", ttft_buckets_s), registry=r)
        self.reuse_gaps = Histogram(f"{p}block_reuse_gap_seconds", "Time between two lookups of one block.",
                                    buckets=_buckets("gap_buckets_s", gap_buckets_s), registry=r)
        self.lifetimes = Histogram(f"{p}block_lifetime_seconds", "Time a block stayed in a tier.", ["tier"],
                                   buckets=_buckets("lifetime_buckets_s", lifetime_buckets_s), registry=r)
        self.tier_capacity = Gauge(f"{p}tier_capacity_bytes", "Capacity of a tier.", ["tier"], registry=r)
        self.tier_used = Gauge(f"{p}tier_used_bytes", "Bytes a tier holds.", ["tier"], registry=r)
        self.tier_blocks = Gauge(f"{p}tier_blocks", "Blocks a tier holds.", ["tier"], registry=r)
        self._children: dict[tuple[int, str], Any] = {}  # (metric id, tier) -> its labelled child
        self._last_access: OrderedDict[Hashable, float] = OrderedDict()
        self._inserted: OrderedDict[tuple[str, Hashable], float] = OrderedDict()
        self._lock = threading.Lock()

    # -- events ---------------------------------------------------------------------------------------------
    def record_request(
        self, keys: Sequence[Hashable], tiers: Sequence[str | None], ttft_s: float | None,
        prompt_tokens: int, cached_tokens: int,
    ) -> None:
        """One request: `keys[i]` was found in `tiers[i]` (None: missed), its TTFT (None: not measured) and its
        prompt and reused token counts. One counter update per tier, not per block."""
        if len(keys) != len(tiers):
            raise ValueError(f"{len(keys)} block keys for {len(tiers)} hit tiers; expected one tier per key")
        self._check_tokens(prompt_tokens, cached_tokens)
        if ttft_s is not None:
            self.ttft.observe(_seconds("ttft_s", ttft_s))
        self._count_tokens(prompt_tokens, cached_tokens)
        self._gaps(keys)
        for tier, n in Tally(tiers).items():
            self._count_lookups(tier, n)

    def record_lookup(self, key: Hashable, tier: str | None) -> None:
        """A request looked `key` up and found it in `tier` (None: a miss)."""
        self._gaps((key,))
        self._count_lookups(tier, 1)

    def record_insert(self, key: Hashable, tier: str) -> None:
        """`key` entered `tier` (its lifetime there starts now; a second insert restarts it)."""
        now = self.clock()
        with self._lock:
            self._inserted.pop((tier, key), None)
            self._inserted[(tier, key)] = now
            if len(self._inserted) > self.max_blocks:
                self._inserted.popitem(last=False)
        self._tier(self.inserts, tier).inc()

    def record_evict(self, key: Hashable, tier: str) -> float | None:
        """`key` left `tier`; returns its lifetime there (seconds), None if its insert was not seen."""
        now = self.clock()
        with self._lock:
            born = self._inserted.pop((tier, key), None)
        self._tier(self.evictions, tier).inc()
        if born is None:
            return None
        lifetime = max(0.0, now - born)
        self._tier(self.lifetimes, tier).observe(lifetime)
        return lifetime

    def record_ttft(self, seconds: float, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """One request's time to first token, with its prompt and reused (cached) token counts."""
        self._check_tokens(prompt_tokens, cached_tokens)
        self.ttft.observe(_seconds("seconds", seconds))
        self._count_tokens(prompt_tokens, cached_tokens)

    def record_tier_usage(self, usage: TierUsage) -> None:
        """The latest capacity and fill of a tier (gauges; a value the tier cannot know is left unset)."""
        for gauge, value in ((self.tier_capacity, usage.capacity_bytes), (self.tier_used, usage.used_bytes),
                             (self.tier_blocks, usage.num_blocks)):  # fmt: skip
            if value is not None:
                self._tier(gauge, usage.name).set(value)

    def record_prefetch(self, promoted: int) -> None:
        """`promoted` blocks were promoted into the fast tier ahead of their request."""
        if promoted:
            self.prefetched.inc(promoted)

    # -- read-outs ------------------------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (what a /metrics endpoint serves)."""
        return generate_latest(self.registry)

    def hit_rates(self) -> dict[str, float]:
        """Per tier, the fraction of all block lookups it answered (the `miss` entry is the miss rate)."""
        lookups = self._lookups()
        total = sum(lookups.values())
        return {tier: n / total for tier, n in lookups.items()} if total else {}

    def snapshot(self) -> dict[str, Any]:
        """The metrics as a JSON-able dict (counts as ints; histograms as cumulative buckets, count and sum)."""
        lookups = self._lookups()
        total = sum(lookups.values())
        usage: dict[str, dict[str, int]] = {}
        for key, gauge in (("capacity_bytes", self.tier_capacity), ("used_bytes", self.tier_used),
                           ("blocks", self.tier_blocks)):  # fmt: skip
            for labels, value in _values(gauge, ""):
                usage.setdefault(labels["tier"], {})[key] = int(value)
        return {
            "lookups": lookups,
            "hit_rate": {t: n / total for t, n in lookups.items()} if total else {},
            "inserts": _by_tier(self.inserts),
            "evictions": _by_tier(self.evictions),
            "prefetched_blocks": int(_total(self.prefetched)),
            "reuse_gap_s": _histogram(self.reuse_gaps),
            "block_lifetime_s": {labels["tier"]: h for labels, h in _histograms(self.lifetimes)},
            "ttft_s": _histogram(self.ttft),
            "prompt_tokens": int(_total(self.queries)),
            "cached_tokens": int(_total(self.hits)),
            "tiers": dict(sorted(usage.items())),
        }

    # -- internals ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_tokens(prompt_tokens: int, cached_tokens: int) -> None:
        for name, value in (("prompt_tokens", prompt_tokens), ("cached_tokens", cached_tokens)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} must be an integer")
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError(
                f"prompt_tokens={prompt_tokens!r}, cached_tokens={cached_tokens!r}: expected 0 <= cached <= prompt"
            )

    def _count_tokens(self, prompt_tokens: int, cached_tokens: int) -> None:
        if prompt_tokens:
            self.queries.inc(prompt_tokens)
        if cached_tokens:
            self.hits.inc(cached_tokens)

    def _count_lookups(self, tier: str | None, n: int) -> None:
        if tier is None:
            self.block_misses.inc(n)
        else:
            self._tier(self.block_hits, str(tier)).inc(n)

    def _tier(self, metric: MetricWrapperBase, tier: str) -> Any:
        """`metric.labels(tier=tier)`, memoised (labels() validates and locks on every call; a child is stable)."""
        key = (id(metric), tier)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(tier=tier)
        return child

    def _gaps(self, keys: Sequence[Hashable]) -> None:
        """Observe the time since each key's previous lookup, and remember this one."""
        now = self.clock()
        gaps: list[float] = []
        with self._lock:
            for key in keys:
                last = self._last_access.pop(key, None)
                if last is not None:
                    gaps.append(max(0.0, now - last))
                self._last_access[key] = now
            while len(self._last_access) > self.max_blocks:
                self._last_access.popitem(last=False)
        for gap in gaps:
            self.reuse_gaps.observe(gap)

    def _lookups(self) -> dict[str, int]:
        lookups = _by_tier(self.block_hits)
        misses = int(_total(self.block_misses))
        if misses:
            lookups[MISS] = misses
        return dict(sorted(lookups.items()))


def _values(metric: MetricWrapperBase, suffix: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of each sample of `metric` named <family name><suffix>."""
    out = []
    for family in metric.collect():
        out.extend((s.labels, s.value) for s in family.samples if s.name == family.name + suffix)
    return out


def _total(counter: Counter) -> float:
    return sum(value for _, value in _values(counter, "_total"))


def _by_tier(counter: Counter) -> dict[str, int]:
    return dict(sorted((labels["tier"], int(value)) for labels, value in _values(counter, "_total") if value))


def _histograms(histogram: Histogram) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """Per label set (without `le`): {"buckets": {le: cumulative count}, "count", "sum"}."""
    found: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for family in histogram.collect():
        for s in family.samples:
            labels = {k: v for k, v in s.labels.items() if k != "le"}
            entry = found.setdefault(tuple(sorted(labels.items())), {"buckets": {}, "count": 0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                entry["buckets"][s.labels["le"]] = int(s.value)
            elif s.name.endswith("_count"):
                entry["count"] = int(s.value)
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
    return [(dict(labels), entry) for labels, entry in sorted(found.items())]


def _histogram(histogram: Histogram) -> dict[str, Any]:
    entries = _histograms(histogram)
    return entries[0][1] if entries else {"buckets": {}, "count": 0, "sum": 0.0}
