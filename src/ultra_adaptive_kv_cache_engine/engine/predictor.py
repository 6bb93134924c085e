"""`WorkloadPredictor`: request rate, prefix reuse and reuse distances, measured, and forecast a short horizon.

It is told of each request's block hashes (in prefix order) and sizes; it never acts. What it answers:
- `forecast(h)`: request and block-access rates over the next `h` seconds (Holt's linear trend over rates
  counted per `interval_s` bin) and the expected prefix reuse;
- `hit_rate(c)` / `hit_rate_curve(cs)`: the LRU hit rate a cache of `c` bytes would have had on the recent
  stream (exact stack distances, exponentially decayed with `half_life_s`, so a phase change shows);
- `reuse_distances()` and `prefix_reuse()`: the distributions themselves.
The clock is injected; all times are its seconds. Thread-safe (one lock; every method is O(log n) or
O(buckets)).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from ..policies.base import Clock
from .reuse_distance import DecayedHistogram, ReuseDistanceTracker

REUSE_BINS = 10
"""Prefix-reuse fractions are kept in 10 bins: [0, 0.1), ..., [0.9, 1.0) and 1.0 itself in the last."""


@dataclass(frozen=True)
class Forecast:
    """Expected workload over the next `horizon_s` seconds (rates per second, reuse as a fraction)."""

    horizon_s: float
    request_rate: float
    access_rate: float
    expected_requests: float
    prefix_reuse: float


@dataclass(frozen=True)
class PrefixReuse:
    """Decayed distribution of the fraction of a request's leading blocks seen before.

    `histogram[i]` is the probability of a fraction in [i/10, (i+1)/10) (the last bin includes 1.0).
    """

    mean: float
    histogram: tuple[float, ...]


@dataclass(frozen=True)
class RequestReuse:
    """What one observed request reused: leading blocks seen before, and each block's stack distance."""

    reused_blocks: int
    total_blocks: int
    distances: tuple[int | None, ...]


class RateSeries:
    """Counts per fixed interval, smoothed by Holt's linear trend; empty intervals count as zero.

    Invariant: `level` and `trend` cover every interval closed so far (at most `max_gap` empty ones are
    replayed after a long silence; older silence just resets to a zero level).
    """

    def __init__(self, interval_s: float, alpha: float, beta: float, max_gap: int = 1000) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s!r} must be positive")
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value!r} must be in (0, 1]")
        self.interval_s, self.alpha, self.beta, self.max_gap = interval_s, alpha, beta, max_gap
        self.level: float | None = None
        self.trend = 0.0
        self._bin: int | None = None
        self._count = 0.0

    def add(self, now: float, count: float = 1.0) -> None:
        self.advance(now)
        self._count += count

    def advance(self, now: float) -> None:
        """Close every interval that ended at or before `now`."""
        current = math.floor(now / self.interval_s)
        if self._bin is None:
            self._bin = current
            return
        gap = current - self._bin
        if gap > self.max_gap:
            self.level, self.trend, self._count, self._bin = 0.0, 0.0, 0.0, current
            return
        for _ in range(max(0, gap)):
            self._close(self._count)
            self._count = 0.0
        self._bin = max(self._bin, current)

    def _close(self, count: float) -> None:
        if self.level is None:
            self.level = count
            return
        previous = self.level
        self.level = self.alpha * count + (1 - self.alpha) * (previous + self.trend)
        self.trend = self.beta * (self.level - previous) + (1 - self.beta) * self.trend

    def rate(self, horizon_s: float = 0.0) -> float:
        """Expected events per second, averaged over the next max(1, horizon_s / interval_s) intervals."""
        if self.level is None:  # no interval closed yet: what the open one has counted so far
            return self._count / self.interval_s
        steps = max(1.0, horizon_s / self.interval_s)
        mean_count = self.level + self.trend * (1.0 + steps) / 2.0
        return max(0.0, mean_count) / self.interval_s


class WorkloadPredictor:
    """Measures the request stream and forecasts it; see the module docstring.

    `half_life_s` weighs reuse statistics (None: all history weighs the same); `alpha`/`beta` are Holt's
    smoothing factors of the per-interval rates; `max_keys` bounds the blocks tracked for stack distances.
    `unit_bytes` is the resolution of the hit-rate curve: required capacities are rounded up to whole units
    (kept exactly up to 1024 units, within 1.1% above), so with blocks of one size, `unit_bytes` = that size
    makes `hit_rate` exact at every whole number of blocks.
    """

    def __init__(
        self,
        clock: Clock | None = None,
        interval_s: float = 1.0,
        half_life_s: float | None = 60.0,
        alpha: float = 0.5,
        beta: float = 0.3,
        max_keys: int = 1_000_000,
        unit_bytes: int = 1,
    ) -> None:
        if isinstance(unit_bytes, bool) or not isinstance(unit_bytes, int) or unit_bytes < 1:
            raise ValueError(f"unit_bytes={unit_bytes!r} must be a positive integer")
        self.unit_bytes = unit_bytes
        self.clock = clock or time.monotonic
        self.requests = RateSeries(interval_s, alpha, beta)
        self.accesses = RateSeries(interval_s, alpha, beta)
        self._tracker = ReuseDistanceTracker(max_keys)
        self._required = DecayedHistogram(half_life_s)
        self._reuse = DecayedHistogram(half_life_s)  # bucket i: prefix-reuse fraction in [i/10, (i+1)/10)
        self._lock = threading.RLock()

    def observe_access(self, key: Hashable, size: int) -> int | None:
        """One block access outside a request; returns its stack distance in bytes (None: cold)."""
        with self._lock:
            now = self.clock()
            self.accesses.add(now)
            return self._access(key, size, now)

    def observe_request(self, keys: Sequence[Hashable], sizes: int | Sequence[int]) -> RequestReuse:
        """A request reading `keys` in prefix order; `sizes` is one size for all blocks or one per block."""
        with self._lock:
            sizes = [sizes] * len(keys) if isinstance(sizes, int) else list(sizes)
            if len(sizes) != len(keys):
                raise ValueError(f"{len(sizes)} sizes for {len(keys)} keys; expected one size or one per key")
            now = self.clock()
            self.requests.add(now)
            self.accesses.add(now, len(keys))
            distances = tuple(self._access(k, s, now) for k, s in zip(keys, sizes, strict=True))
            reused = next((i for i, d in enumerate(distances) if d is None), len(distances))
            if distances:
                fraction = reused / len(distances)
                self._reuse.add_bucket(min(REUSE_BINS - 1, int(fraction * REUSE_BINS)), now, fraction)
            return RequestReuse(reused, len(distances), distances)

    def _access(self, key: Hashable, size: int, now: float) -> int | None:
        distance = self._tracker.access(key, size)
        self._required.add(None if distance is None else -(-(distance + size) // self.unit_bytes), now)
        return distance

    # -- answers ----------------------------------------------------------------------------------------------
    def request_rate(self) -> float:
        """Smoothed requests per second now."""
        with self._lock:
            self.requests.advance(self.clock())
            return self.requests.rate()

    def access_rate(self, horizon_s: float = 0.0) -> float:
        """Expected block accesses per second over the next `horizon_s` seconds."""
        with self._lock:
            self.accesses.advance(self.clock())
            return self.accesses.rate(horizon_s)

    def forecast(self, horizon_s: float) -> Forecast:
        """The expected workload over the next `horizon_s` seconds (> 0)."""
        with self._lock:
            if not horizon_s > 0:
                raise ValueError(f"horizon_s={horizon_s!r} must be positive")
            now = self.clock()
            self.requests.advance(now)
            self.accesses.advance(now)
            rate = self.requests.rate(horizon_s)
            return Forecast(horizon_s, rate, self.accesses.rate(horizon_s), rate * horizon_s, self.prefix_reuse().mean)

    def hit_rate(self, capacity_bytes: int) -> float:
        """Predicted LRU hit rate (0..1) of a cache of `capacity_bytes` on the recent stream."""
        with self._lock:
            return self._required.hit_rate(capacity_bytes // self.unit_bytes)

    def hit_rate_curve(self, capacities: Sequence[int]) -> tuple[float, ...]:
        return tuple(self.hit_rate(c) for c in capacities)

    def reuse_distances(self) -> tuple[tuple[int, float], ...]:
        """(required capacity in bytes (a bucket edge), probability) of re-accesses; cold ones excluded."""
        with self._lock:
            return tuple((edge * self.unit_bytes, p) for edge, p in self._required.distribution())

    def cold_fraction(self) -> float:
        """Weight of first-time accesses among all accesses (decayed)."""
        with self._lock:
            total = self._required.total
            return self._required.cold / total if total else 0.0

    def prefix_reuse(self) -> PrefixReuse:
        with self._lock:
            total = self._reuse.total
            if total <= 0.0:
                return PrefixReuse(0.0, tuple([0.0] * REUSE_BINS))
            bins = tuple(self._reuse.weights.get(i, 0.0) / total for i in range(REUSE_BINS))
            return PrefixReuse(self._reuse.mean_value, bins)

    @property
    def tracked_blocks(self) -> int:
        return len(self._tracker)
