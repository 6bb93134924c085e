"""A recency list grouped by clock tick: older ticks leave first, and within one tick the last touched.

Why: a prefix store touches a request's blocks root first, so plain LRU would evict the root of a chain
before its children and strand them (a child is only reachable through its parents). When the injected
clock reads the same value for all events of one request (a request counter, or its arrival time), the
blocks touched by that request form one group and leave leaf first, as vLLM frees a request's blocks in
reverse order. With a clock that differs at every event this is exactly least-recently-used order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator


class TickList:
    """Keys with sizes; eviction order is (tick ascending, then last touched first within a tick).

    Invariants: `total` is the sum of the sizes held; a key is held at most once, in the group of the tick
    of its last touch; ticks never go backwards (a clock reading lower than the newest tick counts as the
    newest). Layout: the keys of closed ticks sit in one ordered dict in eviction order; the newest tick's keys sit
    in a second dict in touch order, appended reversed to the first when a newer tick begins (each key
    moves once per touch). O(1) amortised per touch and pop, no allocation per touch; `items()` yields
    (key, size) in eviction order.
    """

    __slots__ = ("_tick", "_closed", "_newest", "_now", "total")

    def __init__(self, tick: Callable[[], float]) -> None:
        self._tick = tick
        self._closed: OrderedDict[Hashable, int] = OrderedDict()  # older ticks, eviction order (an OrderedDict:
        # a plain dict popped at its head makes every iteration from the head skip the holes)
        self._newest: dict[Hashable, int] = {}  # the newest tick, touch order
        self._now: float = float("-inf")
        self.total = 0

    def touch(self, key: Hashable, size: int) -> None:
        self.touch_at(key, size, self._tick())

    def touch_at(self, key: Hashable, size: int, now: float) -> None:
        """`touch` with the clock read by the caller (one read for several lists)."""
        newest = self._newest
        old = newest.pop(key, None)
        if old is None:
            old = self._closed.pop(key, None)
        if old is not None:
            self.total -= old
        if now > self._now:
            self._now = now
            if newest:
                closed = self._closed
                for k, v in reversed(newest.items()):
                    closed[k] = v
                newest.clear()
        newest[key] = size
        self.total += size

    def add(self, key: Hashable, size: int) -> None:
        """`touch` of a key known not to be held (the caller checked): skips the lookups that remove it."""
        self.add_at(key, size, self._tick())

    def add_at(self, key: Hashable, size: int, now: float) -> None:
        """`add` with the clock read by the caller."""
        newest = self._newest
        if now > self._now:
            self._now = now
            if newest:
                closed = self._closed
                for k, v in reversed(newest.items()):
                    closed[k] = v
                newest.clear()
        newest[key] = size
        self.total += size

    def pop(self, key: Hashable) -> int | None:
        size = self._newest.pop(key, None)
        if size is None:
            size = self._closed.pop(key, None)
            if size is None:
                return None
        self.total -= size
        return size

    def pop_first(self) -> tuple[Hashable, int]:
        """Removes and returns (key, size) of the first key of the eviction order (KeyError when empty)."""
        if self._closed:
            key, size = self._closed.popitem(last=False)
        elif self._newest:
            key, size = self._newest.popitem()
        else:
            raise KeyError("pop_first() of an empty TickList")
        self.total -= size
        return key, size

    def first(self) -> Hashable:
        """The first key of the eviction order (KeyError when empty)."""
        if self._closed:
            return next(iter(self._closed))
        if self._newest:
            return next(reversed(self._newest))
        raise KeyError("first() of an empty TickList")

    def items(self) -> Iterator[tuple[Hashable, int]]:
        yield from self._closed.items()
        yield from reversed(self._newest.items())

    def __contains__(self, key: object) -> bool:
        return key in self._newest or key in self._closed

    def __len__(self) -> int:
        return len(self._newest) + len(self._closed)
