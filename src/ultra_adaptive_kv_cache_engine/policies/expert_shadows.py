"""Shadow caches of the default experts with the policy inlined: the same hits as `ShadowCache`, fewer calls.

`ShadowCache(policy, c)` drives any policy through its public methods (a victims list, a removal, an
insert, each reading the clock). The adaptive policy's shadows see every reference of the store, so for its
default experts these classes do the same steps on the experts' own structures, with the tick passed in:
`LRUShadow` is `ShadowCache(TickLRUPolicy(c), c)` and `TwoQShadow(c, freq)` is
`ShadowCache(TwoQFrequencyPolicy(c) if freq else TwoQAdaptivePolicy(c), c)`, step for step (same score,
same keys held, same order; tests/test_policies_family.py replays random streams through both). Both need
a capacity (the fixed-capacity case); `ShadowCache` serves the others.
"""

from __future__ import annotations

from collections.abc import Hashable

from .tick_order import TickList
from .tick_policies import TickLRUPolicy
from .twoq_adaptive import (
    GHOST_CAPACITIES,
    INITIAL_SHARE,
    MAIN_GHOST_CAPACITIES,
    MAX_SHARE,
    MIN_SHARE,
    WINDOW,
    StampedGhost,
    TwoQAdaptivePolicy,
)
from .twoq_freq import MAX_FREQ, TwoQFrequencyPolicy, freq_victims


def _never() -> float:
    raise AssertionError("expert shadows pass the tick; their lists never read a clock")


class LRUShadow:
    """Tick-ordered LRU at `capacity` units: `touch` scores a hit unless a miss of the same tick came first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.score = 0.0
        self._order = TickList(_never)
        self._size: dict[Hashable, int] = {}
        self._missed_tick: float | None = None

    def touch(self, key: Hashable, size: int, tick: float, weight: float) -> None:
        sizes, order = self._size, self._order
        held = sizes.get(key)
        if held is not None:
            order.touch_at(key, held, tick)
            if tick != self._missed_tick:
                self.score += weight * size
            return
        self._missed_tick = tick
        capacity = self.capacity
        if size > capacity:
            return
        used = self.used
        while used + size > capacity:
            victim, _ = order.pop_first()
            used -= sizes.pop(victim)
        order.add_at(key, size, tick)
        sizes[key] = size
        self.used = used + size

    def __contains__(self, key: object) -> bool:
        return key in self._size


class TwoQShadow:
    """twoq_adaptive (or, with `freq`, twoq_freq) alone at `capacity` units, scored as `ShadowCache` does."""

    def __init__(self, capacity: int, freq: bool) -> None:
        self.capacity = capacity
        self.used = 0
        self.score = 0.0
        self.share = INITIAL_SHARE
        self._probation = TickList(_never)
        self._main = TickList(_never)
        self._probation_ghost = StampedGhost()
        self._main_ghost = StampedGhost()
        self._size: dict[Hashable, int] = {}
        self._freq: dict[Hashable, int] | None = {} if freq else None
        self._missed_tick: float | None = None

    def touch(self, key: Hashable, size: int, tick: float, weight: float) -> None:
        sizes = self._size
        held = sizes.get(key)
        if held is not None:
            self._hit(key, held, tick)
            if tick != self._missed_tick:
                self.score += weight * size
            return
        self._missed_tick = tick
        capacity = self.capacity
        if size > capacity:
            return
        used = self.used
        while used + size > capacity:
            used -= self._evict_one(tick)
        self._insert(key, size, tick)
        self.used = used + size

    def _hit(self, key: Hashable, size: int, tick: float) -> None:
        freq = self._freq
        if self._probation.pop(key) is None and freq is not None:
            count = freq.get(key, 0)
            if count < MAX_FREQ:
                freq[key] = count + 1
        self._main.touch_at(key, size, tick)

    def _evict_one(self, tick: float) -> int:
        probation, main, freq = self._probation, self._main, self._freq
        floor = self.share * self.capacity
        if len(probation) and (probation.total >= floor or not len(main)):
            victim, size = probation.pop_first()
            del self._size[victim]
            if freq is not None:
                freq.pop(victim, None)
            self._probation_ghost.add(victim, size, GHOST_CAPACITIES * self.capacity)
            return size
        if freq is not None and freq.get(main.first()):  # second chances: the expert's own walk
            (victim,) = freq_victims(probation, main, freq, floor, 1, tick)
            size = self._size.pop(victim)
            freq.pop(victim, None)
            if probation.pop(victim) is not None:  # the walk ran out of main: probation's first
                self._probation_ghost.add(victim, size, GHOST_CAPACITIES * self.capacity)
                return size
            main.pop(victim)
        else:
            victim, size = main.pop_first()
            del self._size[victim]
            if freq is not None:
                freq.pop(victim, None)
        self._main_ghost.add(victim, size, MAIN_GHOST_CAPACITIES * self.capacity)
        return size

    def _insert(self, key: Hashable, size: int, tick: float) -> None:
        self._size[key] = size
        c = self.capacity
        since = self._probation_ghost.pop(key)
        if since is not None:
            if since <= WINDOW * c:
                self.share = min(MAX_SHARE, self.share + size / c)
            self._main.add_at(key, size, tick)
        elif (since := self._main_ghost.pop(key)) is not None:
            if since <= WINDOW * c:
                self.share = max(MIN_SHARE, self.share - size / c)
            self._main.add_at(key, size, tick)
        else:
            self._probation.add_at(key, size, tick)

    def __contains__(self, key: object) -> bool:
        return key in self._size


ExpertShadow = LRUShadow | TwoQShadow
EXPERT_SHADOWS = {  # expert class -> its inlined shadow at a capacity
    TickLRUPolicy: LRUShadow,
    TwoQAdaptivePolicy: lambda capacity: TwoQShadow(capacity, freq=False),
    TwoQFrequencyPolicy: lambda capacity: TwoQShadow(capacity, freq=True),
}
