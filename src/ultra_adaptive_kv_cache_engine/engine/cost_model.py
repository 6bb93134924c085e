"""The measured costs behind compute-or-load: tier bandwidths (EWMA) and prefill time (a fitted quadratic).

- `BandwidthModel`: bytes per second of each tier, an exponentially weighted mean of observed transfers
  (time per byte is averaged, so one slow transfer weighs as much as it cost), seeded by a prior (a probe).
- `PrefillCostModel`: the time to prefill tokens [start, end) of a prompt whose first `start` tokens are
  cached. Token p costs a + b*p (projections and MLP, plus attention over p earlier tokens), and each cached
  token costs d (placing its KV where attention reads it), so
      t(start, end) = c0 + a*(end - start) + b*(end**2 - start**2) / 2 + d*start
  with c0 the fixed cost of one forward. (c0, a, b, d) are fitted by least squares of relative errors on the
  observations (window `max_observations`), constrained to be >= 0, with no more unknowns than distinct
  (start, end) points: one point fits `a`; two fit `a`, `b`; three add `c0`; `d` needs a fourth point with
  start > 0. Repeated observations of one point count once, by their median, and errors are relative: one
  slow long run (a busy machine) neither bends the curve nor outweighs the many short prefills.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass

import numpy as np


def _check_seconds(seconds: float) -> float:
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"seconds={seconds!r} must be a positive finite duration")
    return float(seconds)


class BandwidthModel:
    """Per-tier bandwidth (bytes/s). Invariant: a tier has a bandwidth iff it had a prior or an observation."""

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} must be in (0, 1]")
        self.alpha = alpha
        self._seconds_per_byte: dict[str, float] = {}
        self.observations: dict[str, int] = {}

    def set_prior(self, tier: str, bytes_per_s: float) -> None:
        """The bandwidth of `tier` before (or instead of) observations, e.g. from a short probe."""
        if not bytes_per_s > 0:
            raise ValueError(f"bytes_per_s={bytes_per_s!r} must be positive")
        self._seconds_per_byte[tier] = 1.0 / bytes_per_s

    def observe(self, tier: str, nbytes: int, seconds: float) -> None:
        """A transfer of `nbytes` from `tier` took `seconds`."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes={nbytes!r} must be a positive integer")
        sample = _check_seconds(seconds) / nbytes
        current = self._seconds_per_byte.get(tier)
        self._seconds_per_byte[tier] = sample if current is None else self.alpha * sample + (1 - self.alpha) * current
        self.observations[tier] = self.observations.get(tier, 0) + 1

    def bandwidth(self, tier: str) -> float:
        """Bytes per second of `tier`; ValueError naming the measured tiers if it was never measured."""
        spb = self._seconds_per_byte.get(tier)
        if spb is None:
            raise ValueError(f"tier {tier!r} has no measured bandwidth; measured: {sorted(self._seconds_per_byte)}")
        return 1.0 / spb

    def transfer_time(self, tier: str, nbytes: int) -> float:
        return nbytes / self.bandwidth(tier)

    def tiers(self) -> tuple[str, ...]:
        return tuple(sorted(self._seconds_per_byte))


@dataclass(frozen=True)
class PrefillFit:
    """t(start, end) = fixed_s + per_token_s*(end-start) + per_token_pos_s*(end^2-start^2)/2
    + per_cached_token_s*start (seconds)."""

    fixed_s: float
    per_token_s: float
    per_token_pos_s: float
    per_cached_token_s: float = 0.0

    def time(self, start: int, end: int) -> float:
        if end <= start:
            return 0.0
        return sum(c * f for c, f in zip(self.coefficients, _features(start, end), strict=True))

    @property
    def coefficients(self) -> tuple[float, float, float, float]:
        return (self.fixed_s, self.per_token_s, self.per_token_pos_s, self.per_cached_token_s)


def _features(start: int, end: int) -> list[float]:
    return [1.0, float(end - start), (end * end - start * start) / 2.0, float(start)]


class PrefillCostModel:
    """Prefill time as a function of cached and total tokens, fitted from observations (see module doc)."""

    def __init__(self, max_observations: int = 256) -> None:
        if isinstance(max_observations, bool) or not isinstance(max_observations, int) or max_observations < 1:
            raise ValueError(f"max_observations={max_observations!r} must be a positive integer")
        self._observations: deque[tuple[int, int, float]] = deque(maxlen=max_observations)
        self._fit: PrefillFit | None = None

    def observe(self, start: int, end: int, seconds: float) -> None:
        """Prefilling tokens [start, end) (the first `start` cached) took `seconds`."""
        if isinstance(start, bool) or isinstance(end, bool) or not 0 <= start < end:
            raise ValueError(f"start={start!r}, end={end!r}: expected integers with 0 <= start < end")
        self._observations.append((int(start), int(end), _check_seconds(seconds)))
        self._fit = None

    def __len__(self) -> int:
        return len(self._observations)

    def fit(self) -> PrefillFit:
        """The least-squares fit (cached until the next observation); ValueError before any observation."""
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    def time(self, start: int, end: int) -> float:
        return self.fit().time(start, end)

    def _solve(self) -> PrefillFit:
        if not self._observations:
            raise ValueError("the prefill cost model has no observation yet; observe or probe a prefill first")
        groups: dict[tuple[int, int], list[float]] = {}
        for start, end, seconds in self._observations:
            groups.setdefault((start, end), []).append(seconds)
        points = {point: statistics.median(values) for point, values in groups.items()}
        rows = [_features(s, e) for s, e in points]
        times = list(points.values())
        active = [[1], [1, 2], [0, 1, 2], [0, 1, 2, 3]][min(len(points), 4) - 1]
        if 3 in active and not any(s > 0 for s, _ in points):
            active.remove(3)  # nothing cached was ever observed: the cached-token cost is unknown
        weights = np.array([1.0 / t for t in times])  # relative errors: a noisy long run does not bend the curve
        while True:  # non-negative least squares: drop the most negative coefficient and refit
            a = np.array([[r[j] for j in active] for r in rows]) * weights[:, None]
            coef, *_ = np.linalg.lstsq(a, np.array(times) * weights, rcond=None)
            if (coef >= 0).all() or len(active) == 1:
                break
            del active[int(np.argmin(coef))]
        full = [0.0, 0.0, 0.0, 0.0]
        for j, c in zip(active, coef, strict=True):
            full[j] = max(0.0, float(c))
        if full == [0.0, 0.0, 0.0, 0.0]:  # degenerate data: charge the mean time per token
            full[1] = sum(times) / sum(e - s for s, e in points)
        return PrefillFit(*full)
