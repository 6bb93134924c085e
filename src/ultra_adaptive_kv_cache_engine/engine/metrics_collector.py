"""`AdvancedMetricsCollector`: hit rates per tier, reuse gaps, block lifetimes, TTFT histograms.

It is told of events (a block found in a tier or missed, a block inserted into or evicted from a tier, a
request's time to first token, a tier's usage) and keeps counters and cumulative histograms. Two read-outs:
`snapshot()` (a JSON-able dict) and `prometheus_samples()` (name, labels, value) in the Prometheus data
model: counters end in `_total`, histograms give `_bucket{le=...}` (cumulative, `+Inf` last), `_sum`,
`_count`. A Prometheus exporter only has to group the samples by name. Thread-safe; the clock is injected.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Sequence
from typing import Any

from ..policies.base import Clock
from ..tiers import TierUsage

PREFIX = "uakv"
MISS = "miss"
"""The `tier` label of a lookup that no tier answered."""

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
GAP_BUCKETS_S = (0.1, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 86400.0)
LIFETIME_BUCKETS_S = (1.0, 10.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0)

Sample = tuple[str, dict[str, str], float]


class Histogram:
    """Cumulative histogram with fixed upper bounds (seconds); `+Inf` is implicit.

    Invariant: `counts[i]` is the number of observations <= `bounds[i]` that are > `bounds[i-1]`;
    `count` is all observations (including those above the last bound), `sum` their total.
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"histogram bounds {bounds!r} must be non-empty and strictly increasing")
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"observation {value!r} must be a finite non-negative number")
        self.count += 1
        self.sum += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break

    def cumulative(self) -> list[tuple[str, int]]:
        """(le label, cumulative count) for each bound, then ('+Inf', count)."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            out.append((_le(bound), running))
        out.append(("+Inf", self.count))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"buckets": dict(self.cumulative()), "count": self.count, "sum": self.sum}


def _le(bound: float) -> str:
    return repr(float(bound))


class AdvancedMetricsCollector:
    """Collects cache metrics; see the module docstring. `max_blocks` bounds the blocks tracked for gaps and
    lifetimes (the least recently seen is forgotten first)."""

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
        self._lifetime_buckets = tuple(lifetime_buckets_s)
        self.lookups: dict[str, int] = {}
        self.inserts: dict[str, int] = {}
        self.evictions: dict[str, int] = {}
        self.ttft = Histogram(ttft_buckets_s)
        self.reuse_gaps = Histogram(gap_buckets_s)
        self.lifetimes: dict[str, Histogram] = {}
        self.cached_tokens = 0
        self.prompt_tokens = 0
        self._last_access: OrderedDict[Hashable, float] = OrderedDict()
        self._inserted: OrderedDict[tuple[str, Hashable], float] = OrderedDict()
        self._usage: dict[str, TierUsage] = {}
        self._lock = threading.Lock()

    # -- events ---------------------------------------------------------------------------------------------
    def record_lookup(self, key: Hashable, tier: str | None) -> None:
        """A request looked `key` up and found it in `tier` (None: a miss)."""
        now = self.clock()
        with self._lock:
            label = MISS if tier is None else str(tier)
            self.lookups[label] = self.lookups.get(label, 0) + 1
            last = self._last_access.pop(key, None)
            if last is not None:
                self.reuse_gaps.observe(max(0.0, now - last))
            self._last_access[key] = now
            if len(self._last_access) > self.max_blocks:
                self._last_access.popitem(last=False)

    def record_insert(self, key: Hashable, tier: str) -> None:
        """`key` entered `tier` (its lifetime there starts now; a second insert restarts it)."""
        now = self.clock()
        with self._lock:
            self.inserts[tier] = self.inserts.get(tier, 0) + 1
            self._inserted.pop((tier, key), None)
            self._inserted[(tier, key)] = now
            if len(self._inserted) > self.max_blocks:
                self._inserted.popitem(last=False)

    def record_evict(self, key: Hashable, tier: str) -> float | None:
        """`key` left `tier`; returns its lifetime there (seconds), None if its insert was not seen."""
        now = self.clock()
        with self._lock:
            self.evictions[tier] = self.evictions.get(tier, 0) + 1
            born = self._inserted.pop((tier, key), None)
            if born is None:
                return None
            lifetime = max(0.0, now - born)
            histogram = self.lifetimes.get(tier)
            if histogram is None:
                histogram = self.lifetimes[tier] = Histogram(self._lifetime_buckets)
            histogram.observe(lifetime)
            return lifetime

    def record_ttft(self, seconds: float, prompt_tokens: int = 0, cached_tokens: int = 0) -> None:
        """One request's time to first token, with its prompt and reused (cached) token counts."""
        if not 0 <= cached_tokens <= prompt_tokens:
            raise ValueError(
                f"prompt_tokens={prompt_tokens!r}, cached_tokens={cached_tokens!r}: expected 0 <= cached <= prompt"
            )
        with self._lock:
            self.ttft.observe(seconds)
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens

    def record_tier_usage(self, usage: TierUsage) -> None:
        """The latest capacity and fill of a tier (gauges)."""
        with self._lock:
            self._usage[usage.name] = usage

    # -- read-outs ------------------------------------------------------------------------------------------
    def hit_rates(self) -> dict[str, float]:
        """Per tier, the fraction of all lookups it answered (the `miss` entry is the miss rate)."""
        with self._lock:
            total = sum(self.lookups.values())
            return {tier: n / total for tier, n in sorted(self.lookups.items())} if total else {}

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lookups = dict(sorted(self.lookups.items()))
            total = sum(lookups.values())
            return {
                "lookups": lookups,
                "hit_rate": {t: n / total for t, n in lookups.items()} if total else {},
                "inserts": dict(sorted(self.inserts.items())),
                "evictions": dict(sorted(self.evictions.items())),
                "reuse_gap_s": self.reuse_gaps.as_dict(),
                "block_lifetime_s": {t: h.as_dict() for t, h in sorted(self.lifetimes.items())},
                "ttft_s": self.ttft.as_dict(),
                "prompt_tokens": self.prompt_tokens,
                "cached_tokens": self.cached_tokens,
                "tiers": {
                    name: {"capacity_bytes": u.capacity_bytes, "used_bytes": u.used_bytes, "blocks": u.num_blocks}
                    for name, u in sorted(self._usage.items())
                },
            }

    def prometheus_samples(self) -> Iterator[Sample]:
        """Every metric as (name, labels, value); histograms in Prometheus' cumulative form."""
        with self._lock:
            samples = list(self._counter_samples())
            samples += _histogram_samples(f"{PREFIX}_ttft_seconds", {}, self.ttft)
            samples += _histogram_samples(f"{PREFIX}_reuse_gap_seconds", {}, self.reuse_gaps)
            for tier, histogram in sorted(self.lifetimes.items()):
                samples += _histogram_samples(f"{PREFIX}_block_lifetime_seconds", {"tier": tier}, histogram)
            samples += self._usage_samples()
        yield from samples

    def _counter_samples(self) -> Iterator[Sample]:
        total = sum(self.lookups.values())
        for tier, n in sorted(self.lookups.items()):
            yield f"{PREFIX}_block_lookups_total", {"tier": tier}, float(n)
        for tier, n in sorted(self.lookups.items()):
            yield f"{PREFIX}_hit_rate", {"tier": tier}, n / total
        for tier, n in sorted(self.inserts.items()):
            yield f"{PREFIX}_block_inserts_total", {"tier": tier}, float(n)
        for tier, n in sorted(self.evictions.items()):
            yield f"{PREFIX}_block_evictions_total", {"tier": tier}, float(n)
        yield f"{PREFIX}_prompt_tokens_total", {}, float(self.prompt_tokens)
        yield f"{PREFIX}_cached_tokens_total", {}, float(self.cached_tokens)

    def _usage_samples(self) -> list[Sample]:
        out: list[Sample] = []
        for name, usage in sorted(self._usage.items()):
            for field, value in (("capacity", usage.capacity_bytes), ("used", usage.used_bytes)):
                if value is not None:
                    out.append((f"{PREFIX}_tier_{field}_bytes", {"tier": name}, float(value)))
            if usage.num_blocks is not None:
                out.append((f"{PREFIX}_tier_blocks", {"tier": name}, float(usage.num_blocks)))
        return out


def _histogram_samples(name: str, labels: dict[str, str], histogram: Histogram) -> list[Sample]:
    out: list[Sample] = [(f"{name}_bucket", {**labels, "le": le}, float(n)) for le, n in histogram.cumulative()]
    out.append((f"{name}_sum", dict(labels), histogram.sum))
    out.append((f"{name}_count", dict(labels), float(histogram.count)))
    return out
