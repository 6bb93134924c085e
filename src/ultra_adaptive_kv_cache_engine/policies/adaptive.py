"""The adaptive policy: follows whichever of its expert policies its shadow caches show hitting most."""

from __future__ import annotations

from collections.abc import Hashable

from .base import Clock, EvictionPolicy
from .shadow import ShadowCache
from .tick_policies import TickLRUPolicy
from .twoq_adaptive import TwoQAdaptivePolicy
from .twoq_freq import TwoQFrequencyPolicy

HALF_LIFE_CAPACITIES = 8.0  # a hit weighs half after traffic of this many capacities (scale-free)


# twoq_adaptive leads where its doorkeeper pays (small caches, one-off prompts); twoq_freq where popular
# prompts must outlive recency (shared system prompts at small capacity); LRU where nearly all fits and
# refusing first sightings a long stay costs hits (conversation at 25M tokens).
EXPERTS: tuple[type[EvictionPolicy], ...] = (TwoQAdaptivePolicy, TwoQFrequencyPolicy, TickLRUPolicy)


class AdaptivePolicy(EvictionPolicy):
    """Online choice between expert policies by their shadow caches' recent hits (set dueling, full sets).

    Every event is forwarded to one real instance of each expert (so each keeps its order over the keys
    the store really holds) and, as a reference, to one `ShadowCache` per expert (what that expert alone
    would hit at this capacity). `victims` returns the victims of the expert whose shadow has the highest
    exponentially decayed hit score (half-life: `HALF_LIFE_CAPACITIES` capacities of traffic); ties keep
    the current leader. Only the past is used. Experts are tick-ordered (see `TickList`), so with a clock
    that reads one value per request, blocks leave leaves first and shadows apply the prefix rule.
    c is `capacity`, or when None the largest total size ever tracked. O(1) amortised per event (times
    the number of experts).
    """

    name = "adaptive"

    def __init__(
        self,
        capacity: int | None = None,
        clock: Clock | None = None,
        experts: tuple[type[EvictionPolicy], ...] = EXPERTS,
    ) -> None:
        super().__init__(capacity, clock)
        if not experts:
            raise ValueError("experts must name at least one policy class")
        self._experts = [cls(capacity, self.clock) for cls in experts]
        self._shadows = [ShadowCache(cls(capacity, self.clock), capacity or 1) for cls in experts]
        self._size: dict[Hashable, int] = {}
        self._total = 0
        self._weight = 1.0
        self._growth: tuple[int, int, float] = (0, 0, 1.0)  # (size, shadow capacity, weight factor): one pow per change
        self.leader = 0
        # bound methods, looked up once: every event goes to every expert and every shadow
        self._inserts = tuple(e.on_insert for e in self._experts)
        self._accesses = tuple(e.on_access for e in self._experts)
        self._removes = tuple(e.on_remove for e in self._experts)
        self._touches = tuple(s.touch for s in self._shadows)

    @property
    def experts(self) -> list[str]:
        return [e.name for e in self._experts]

    @property
    def scores(self) -> list[float]:
        """Decayed hit scores of the shadows, in the experts' order (relative values only)."""
        return [s.score / self._weight for s in self._shadows]

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        old = self._size.get(key)
        self._size[key] = size
        self._total += size - (old or 0)
        if self.capacity is None and self._total > self._shadows[0].capacity:
            for shadow in self._shadows:
                shadow.capacity = self._total
        for insert in self._inserts:
            insert(key, size)
        self._reference(key, size)

    def on_access(self, key: Hashable) -> None:
        size = self._size.get(key)
        if size is None:
            return
        for access in self._accesses:
            access(key)
        self._reference(key, size)

    def on_remove(self, key: Hashable) -> None:
        size = self._size.pop(key, None)
        if size is None:
            return
        self._total -= size
        for remove in self._removes:
            remove(key)

    def victims(self, n: int) -> list[Hashable]:
        best = max(range(len(self._shadows)), key=lambda i: (self._shadows[i].score, i == self.leader))
        self.leader = best
        return self._experts[best].victims(n)

    def _reference(self, key: Hashable, size: int) -> None:
        tick = self.clock()
        weight = self._weight
        for touch in self._touches:
            touch(key, size, tick, weight)
        capacity = self._shadows[0].capacity
        cached_size, cached_capacity, factor = self._growth
        if size != cached_size or capacity != cached_capacity:
            factor = 2.0 ** (size / (HALF_LIFE_CAPACITIES * capacity))
            self._growth = (size, capacity, factor)
        self._weight = weight * factor
        if self._weight > 1e100:  # renormalise: only ratios of scores matter
            for shadow in self._shadows:
                shadow.score /= self._weight
            self._weight = 1.0

    def __len__(self) -> int:
        return len(self._size)

    def __contains__(self, key: object) -> bool:
        return key in self._size
