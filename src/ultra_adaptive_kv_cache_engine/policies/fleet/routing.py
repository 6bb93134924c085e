"""Routing policies: which instance of a fleet serves a request. Small and pure, one registry.

A policy is shown one `InstanceView` per instance that can take the request now: how many leading units of
the request that instance is believed to hold cached (`matched`, in blocks, chunks or tokens: any unit, the
same for all views) and its load (`load`: requests in flight for the live router, seconds of queued prefill
for the fleet simulator; any unit, the same for all views). It answers the index of the chosen view. It does
no I/O and keeps no state but its own counters; the caller (the router, the simulator) measures and acts.

- `round_robin`: the next instance in turn, whatever the cache (the baseline every router has);
- `least_loaded`: the instance with the least load (ties: the next in turn);
- `cache_aware`: the instance with the longest cached prefix, unless that prefix covers less than
  `cache_threshold` of the request (then: least loaded, as for a new prompt) or that instance is overloaded:
  its load exceeds the least load by more than `balance_abs` and by a factor over `balance_rel` (then: least
  loaded). SGLang's cache-aware router makes the same trade with the same two thresholds.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class InstanceView:
    """What a policy knows of one instance for one request: `matched` leading units cached (>= 0) and `load`."""

    matched: int
    load: float


class RoutingPolicy(ABC):
    """Chooses one of `views` (non-empty) for a request of `total` units; returns its index."""

    name: ClassVar[str] = ""
    uses_cache: ClassVar[bool] = False
    """Whether `choose` reads `matched` (callers that must work to compute it may skip that work otherwise)."""

    @abstractmethod
    def choose(self, views: Sequence[InstanceView], total: int) -> int: ...


class RoundRobinPolicy(RoutingPolicy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, views: Sequence[InstanceView], total: int) -> int:
        _require_views(views)
        index = self._turn % len(views)
        self._turn += 1
        return index


class LeastLoadedPolicy(RoutingPolicy):
    name = "least_loaded"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, views: Sequence[InstanceView], total: int) -> int:
        _require_views(views)
        self._turn += 1
        return _least_loaded(views, range(len(views)), self._turn)


class CacheAwarePolicy(RoutingPolicy):
    """Longest cached prefix, balanced against load (see the module docstring). Counts its decisions in
    `decisions` ("cache", "new", "balance") for metrics."""

    name = "cache_aware"
    uses_cache = True

    def __init__(self, balance_abs: float = 4.0, balance_rel: float = 1.5, cache_threshold: float = 0.5) -> None:
        for key, value, low in (("balance_abs", balance_abs, 0.0), ("balance_rel", balance_rel, 1.0),
                                ("cache_threshold", cache_threshold, 0.0)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < low:
                raise ValueError(f"CacheAwarePolicy {key}={value!r} must be a finite number >= {low}")
        if cache_threshold > 1:
            raise ValueError(f"CacheAwarePolicy cache_threshold={cache_threshold!r} must be in [0, 1]")
        self.balance_abs, self.balance_rel, self.cache_threshold = float(balance_abs), float(balance_rel), cache_threshold
        self.decisions = {"cache": 0, "new": 0, "balance": 0}
        self._turn = 0

    def choose(self, views: Sequence[InstanceView], total: int) -> int:
        _require_views(views)
        self._turn += 1
        best = max(v.matched for v in views)
        if total <= 0 or best < self.cache_threshold * total or best == 0:
            self.decisions["new"] += 1
            return _least_loaded(views, range(len(views)), self._turn)
        chosen = _least_loaded(views, [i for i, v in enumerate(views) if v.matched == best], self._turn)
        low = min(v.load for v in views)
        load = views[chosen].load
        if load - low > self.balance_abs and load > self.balance_rel * low:
            self.decisions["balance"] += 1
            return _least_loaded(views, range(len(views)), self._turn)
        self.decisions["cache"] += 1
        return chosen


def _least_loaded(views: Sequence[InstanceView], indices: Sequence[int], turn: int) -> int:
    """The index (of `indices`) of least load; among equals, the first at or after position `turn` in turn."""
    low = min(views[i].load for i in indices)
    tied = [i for i in indices if views[i].load == low]
    return tied[turn % len(tied)]


def _require_views(views: Sequence[InstanceView]) -> None:
    if not views:
        raise ValueError("no instance to route to: views is empty")


ROUTING_POLICIES: dict[str, type[RoutingPolicy]] = {
    RoundRobinPolicy.name: RoundRobinPolicy,
    LeastLoadedPolicy.name: LeastLoadedPolicy,
    CacheAwarePolicy.name: CacheAwarePolicy,
}


def make_routing_policy(name: str, **options: Any) -> RoutingPolicy:
    """A new policy for registry `name`; `options` go to its constructor (only `cache_aware` takes any)."""
    factory = ROUTING_POLICIES.get(str(name).lower())
    if factory is None:
        raise ValueError(f"unknown routing policy {name!r}; expected one of: {', '.join(sorted(ROUTING_POLICIES))}")
    try:
        return factory(**options)
    except TypeError:
        raise ValueError(f"routing policy {name!r} takes no options {sorted(options)}") from None
