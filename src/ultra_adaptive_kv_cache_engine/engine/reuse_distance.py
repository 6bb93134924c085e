"""Exact LRU stack distances in bytes (a Fenwick tree over access times), and a decayed histogram of them.

The stack distance of an access to key k is the number of bytes of OTHER distinct keys accessed since k's
previous access; an LRU cache of capacity C hits the access iff distance + size(k) <= C. So the distribution
of ``distance + size`` ("required capacity") is the whole hit-rate curve of LRU at every capacity.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable

LINEAR_BUCKETS = 1024
"""Required capacities (in units) up to this many are kept exactly, one bucket per unit."""
BUCKETS_PER_OCTAVE = 64
"""Above LINEAR_BUCKETS, one bucket per 2**(1/64) (+1.1% at most): bucket 1024 + j has edge
floor(1024 * 2**(j/64)). An observation r goes to the first bucket whose edge is >= r, so at a capacity
equal to an edge the predicted LRU hit rate is exact, and between edges never above the true one."""


class _Fenwick:
    """Prefix sums over positions 0..n-1 with point updates, O(log n) each."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.tree = [0] * (n + 1)

    def add(self, position: int, amount: int) -> None:
        i = position + 1
        while i <= self.n:
            self.tree[i] += amount
            i += i & -i

    def prefix(self, position: int) -> int:
        """Sum over positions [0, position)."""
        total, i = 0, position
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total


class ReuseDistanceTracker:
    """Stack distances of a stream of (key, size) accesses.

    Invariants: the tree holds, at the position of each tracked key's last access, that key's size, and
    nothing elsewhere; positions are renumbered (compacted) when the time axis fills up. At most `max_keys`
    keys are tracked: the least recently accessed one is forgotten first (its next access counts as cold).
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys={max_keys!r} must be a positive integer")
        self.max_keys = max_keys
        self._last: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()  # key -> (position, size), LRU order
        self._tree = _Fenwick(1024)
        self._now = 0

    def __len__(self) -> int:
        return len(self._last)

    def access(self, key: Hashable, size: int) -> int | None:
        """Record an access; returns its stack distance in bytes, or None for a first (cold) access."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size={size!r} must be a non-negative integer (bytes)")
        if self._now >= self._tree.n:
            self._compact()
        previous = self._last.pop(key, None)
        distance = None
        if previous is not None:
            position, old_size = previous
            distance = self._tree.prefix(self._now) - self._tree.prefix(position + 1)
            self._tree.add(position, -old_size)
        self._tree.add(self._now, size)
        self._last[key] = (self._now, size)
        self._now += 1
        if len(self._last) > self.max_keys:
            _, (position, old_size) = self._last.popitem(last=False)
            self._tree.add(position, -old_size)
        return distance

    def _compact(self) -> None:
        """Renumber tracked keys 0..K-1 in access order; double the axis when more than half is live."""
        size = self._tree.n * 2 if 2 * len(self._last) > self._tree.n else self._tree.n
        self._tree = _Fenwick(size)
        for position, (key, (_, nbytes)) in enumerate(self._last.items()):
            self._last[key] = (position, nbytes)
            self._tree.add(position, nbytes)
        self._now = len(self._last)


def bucket_of(required: int) -> int:
    """The histogram bucket of a required capacity `required` (units, >= 1): the first with edge >= it."""
    if required <= LINEAR_BUCKETS:
        return max(0, required)
    return LINEAR_BUCKETS + math.ceil(BUCKETS_PER_OCTAVE * math.log2(required / LINEAR_BUCKETS) - 1e-9)


def bucket_edge(bucket: int) -> int:
    """The largest required capacity (units) that `bucket` holds: r <= edge iff bucket_of(r) <= bucket."""
    if bucket <= LINEAR_BUCKETS:
        return bucket
    return math.floor(LINEAR_BUCKETS * 2.0 ** ((bucket - LINEAR_BUCKETS) / BUCKETS_PER_OCTAVE) + 1e-9)


class DecayedHistogram:
    """Weights of required capacities (units) in buckets, plus cold accesses, with exponential decay.

    An observation at time t weighs 2**(t / half_life_s) (no decay when half_life_s is None); only ratios of
    weights are ever read, and the scale is renormalised before it overflows. `hit_rate(c)` is the weight of
    buckets whose upper edge is <= c over the total: a conservative LRU hit rate.
    """

    def __init__(self, half_life_s: float | None) -> None:
        if half_life_s is not None and not half_life_s > 0:
            raise ValueError(f"half_life_s={half_life_s!r} must be positive or None")
        self.half_life_s = half_life_s
        self.weights: dict[int, float] = {}
        self.cold = 0.0
        self.value_sum = 0.0
        self._origin = 0.0

    def add(self, required: int | None, now: float) -> None:
        """Add an access needing `required` units of LRU capacity to hit (None: a cold access)."""
        self.add_bucket(None if required is None else bucket_of(required), now)

    def add_bucket(self, bucket: int | None, now: float, value: float = 0.0) -> None:
        """Add one observation to `bucket` (None: cold); `value` enters the decayed `mean_value`."""
        weight = self._weight(now)
        if bucket is None:
            self.cold += weight
        else:
            self.weights[bucket] = self.weights.get(bucket, 0.0) + weight
        self.value_sum += weight * value

    @property
    def mean_value(self) -> float:
        """Decayed mean of the `value`s given to `add_bucket` (0.0 before any)."""
        total = self.total
        return self.value_sum / total if total > 0.0 else 0.0

    @property
    def total(self) -> float:
        return self.cold + sum(self.weights.values())

    def hit_rate(self, capacity: int) -> float:
        """Weight of observations whose bucket edge is <= `capacity` (units) over all weight."""
        total = self.total
        if total <= 0.0:
            return 0.0
        hits = sum(w for b, w in self.weights.items() if bucket_edge(b) <= capacity)
        return hits / total

    def distribution(self) -> tuple[tuple[int, float], ...]:
        """(bucket edge in units, probability among non-cold observations), in increasing order."""
        total = sum(self.weights.values())
        if total <= 0.0:
            return ()
        return tuple((bucket_edge(b), self.weights[b] / total) for b in sorted(self.weights))

    def _weight(self, now: float) -> float:
        if self.half_life_s is None:
            return 1.0
        exponent = (now - self._origin) / self.half_life_s
        if exponent > 512.0:  # renormalise: every weight shrinks by the same factor, ratios stay
            scale = 2.0**-exponent
            self.weights = {b: w * scale for b, w in self.weights.items()}
            self.cold *= scale
            self.value_sum *= scale
            self._origin = now
            exponent = 0.0
        return 2.0**exponent
