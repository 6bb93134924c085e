"""twoq_adaptive, twoq_freq and tick-LRU run as one: the adaptive policy's default experts, fused.

Why: fed the same events, twoq_adaptive and twoq_freq hold the same probation queue, the same ghosts and
the same share (which queue a key is in, and so where its removal goes, depends only on the events); they
differ only in the protected queue's order (twoq_freq's second chances) and its counters. One object keeps
the shared state once and calls no expert methods, so the live path pays for three experts about what it
pays for one and a half.
"""

from __future__ import annotations

from collections.abc import Hashable

from .base import Clock, EvictionPolicy, first_keys
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
    twoq_victims,
)
from .twoq_freq import MAX_FREQ, TwoQFrequencyPolicy, freq_victims


class TwoQFamily:
    """The three experts' states over one set of keys; `victims(i, n)` answers as expert `i` would.

    Experts, in order: twoq_adaptive (P, protected `_recency`), twoq_freq (P, protected `_frequency` with
    counters `_freq`), tick-LRU (`_lru`, every key). Shared: P, the ghosts GP and GM, the share, `sizes`.
    Invariant: after any sequence of events and `victims` calls, `victims(i, n)` equals what a separate
    instance of expert i, given the same events and the same `victims(n)` calls of its own, answers
    (tests/test_policies_family.py checks it on random streams). O(1) amortised per event.
    """

    names = ("twoq_adaptive", "twoq_freq", "tick-lru")
    classes: tuple[type[EvictionPolicy], ...] = (TwoQAdaptivePolicy, TwoQFrequencyPolicy, TickLRUPolicy)

    def __init__(self, capacity: int | None, clock: Clock) -> None:
        self.capacity = capacity
        self._clock = clock  # read once per event, for all four lists
        self.sizes: dict[Hashable, int] = {}
        self._probation = TickList(clock)
        self._recency = TickList(clock)
        self._frequency = TickList(clock)
        self._lru = TickList(clock)
        self._freq: dict[Hashable, int] = {}
        self._probation_ghost = StampedGhost()
        self._main_ghost = StampedGhost()
        self._high_water = 0
        self.share = INITIAL_SHARE

    @property
    def target_capacity(self) -> int:
        return self.capacity if self.capacity is not None else max(1, self._high_water)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        sizes = self.sizes
        if key in sizes:
            sizes[key] = size
            self._touch(key, size)
            return
        sizes[key] = size
        now = self._clock()
        since = self._probation_ghost.pop(key)
        if since is not None:
            c = self.target_capacity
            if since <= WINDOW * c:
                self.share = min(MAX_SHARE, self.share + size / c)
            self._recency.add_at(key, size, now)
            self._frequency.add_at(key, size, now)
        elif (since := self._main_ghost.pop(key)) is not None:
            c = self.target_capacity
            if since <= WINDOW * c:
                self.share = max(MIN_SHARE, self.share - size / c)
            self._recency.add_at(key, size, now)
            self._frequency.add_at(key, size, now)
        else:
            self._probation.add_at(key, size, now)
        self._lru.add_at(key, size, now)
        if self.capacity is None:  # c is the largest total tracked so far
            self._high_water = max(self._high_water, self._probation.total + self._recency.total)

    def on_access(self, key: Hashable) -> None:
        size = self.sizes.get(key)
        if size is not None:
            self._touch(key, size)

    def _touch(self, key: Hashable, size: int) -> None:
        if self._probation.pop(key) is None:
            freq = self._freq.get(key, 0)
            if freq < MAX_FREQ:
                self._freq[key] = freq + 1
        now = self._clock()
        self._recency.touch_at(key, size, now)
        self._frequency.touch_at(key, size, now)
        self._lru.touch_at(key, size, now)

    def on_remove(self, key: Hashable) -> None:
        size = self.sizes.pop(key, None)
        if size is None:
            return
        self._freq.pop(key, None)
        self._lru.pop(key)
        c = self.target_capacity
        if self._probation.pop(key) is not None:
            self._probation_ghost.add(key, size, GHOST_CAPACITIES * c)
        else:
            self._recency.pop(key)
            self._frequency.pop(key)
            self._main_ghost.add(key, size, MAIN_GHOST_CAPACITIES * c)

    def victims(self, expert: int, n: int) -> list[Hashable]:
        """Expert `expert`'s first `n` victims (0: twoq_adaptive, 1: twoq_freq, 2: tick-LRU)."""
        if expert == 0:
            return twoq_victims(self._probation, self._recency, self.share * self.target_capacity, n)
        if expert == 1:
            return freq_victims(self._probation, self._frequency, self._freq, self.share * self.target_capacity, n)
        if expert == 2:
            if n == 1 and len(self._lru):
                return [self._lru.first()]
            return first_keys((key for key, _ in self._lru.items()), n)
        raise ValueError(f"expert={expert!r} must be 0, 1 or 2 ({', '.join(self.names)})")

    def __len__(self) -> int:
        return len(self.sizes)
