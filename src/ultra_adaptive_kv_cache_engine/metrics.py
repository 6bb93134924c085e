"""L0 measurement primitives: monotonic counters and latency recorders with percentiles. Torch-free."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


@dataclass(frozen=True)
class LatencySummary:
    """Percentiles of recorded latencies, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    def as_dict(self) -> dict[str, float]:
        return {
            "count": self.count,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in [0, 100]); 0.0 for an empty list."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, int(round(q / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[rank]


class LatencyRecorder:
    """Keeps the last `window` latencies (seconds) of one operation; `summary()` gives percentiles.

    Invariant: `count` is every sample ever recorded; percentiles cover at most the last `window`.
    """

    def __init__(self, window: int = 10_000) -> None:
        self._samples: deque[float] = deque(maxlen=window)
        self.count = 0
        self.total_s = 0.0

    def record(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1
        self.total_s += seconds

    def summary(self) -> LatencySummary:
        values = sorted(self._samples)
        ms = [v * 1e3 for v in values]
        mean = (self.total_s / self.count * 1e3) if self.count else 0.0
        return LatencySummary(
            count=self.count,
            mean_ms=mean,
            p50_ms=percentile(ms, 50),
            p95_ms=percentile(ms, 95),
            p99_ms=percentile(ms, 99),
            max_ms=ms[-1] if ms else 0.0,
        )


class Profiler:
    """Per-operation counts and latency percentiles; thread-safe. Disabled profilers record nothing."""

    def __init__(self, enabled: bool = True, window: int = 10_000) -> None:
        self.enabled = enabled
        self._window = window
        self._recorders: dict[str, LatencyRecorder] = {}
        self._lock = threading.Lock()

    def record(self, operation: str, seconds: float) -> None:
        if not self.enabled:
            return
        with self._lock:
            recorder = self._recorders.get(operation)
            if recorder is None:
                recorder = self._recorders[operation] = LatencyRecorder(self._window)
            recorder.record(seconds)

    @contextmanager
    def measure(self, operation: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(operation, time.perf_counter() - start)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {name: rec.summary().as_dict() for name, rec in sorted(self._recorders.items())}


class Counters:
    """Named monotonic counters; thread-safe."""

    def __init__(self) -> None:
        self._values: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + amount

    def get(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


LOGGER_NAME = "ultra_adaptive_kv_cache_engine"
