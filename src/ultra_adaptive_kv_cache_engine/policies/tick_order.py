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
    newest). O(1) per touch and pop; `items()` yields (key, size) in eviction order.
    """

    def __init__(self, tick: Callable[[], float]) -> None:
        self._tick = tick
        self._groups: OrderedDict[float, OrderedDict[Hashable, int]] = OrderedDict()
        self._tick_of: dict[Hashable, float] = {}
        self._newest: float = float("-inf")
        self.total = 0

    def touch(self, key: Hashable, size: int) -> None:
        self.pop(key)
        now = self._tick()
        if now < self._newest:
            now = self._newest
        group = self._groups.get(now)
        if group is None:
            group = self._groups[now] = OrderedDict()
            self._newest = now
        group[key] = size
        self._tick_of[key] = now
        self.total += size

    def pop(self, key: Hashable) -> int | None:
        tick = self._tick_of.pop(key, None)
        if tick is None:
            return None
        group = self._groups[tick]
        size = group.pop(key)
        if not group:
            del self._groups[tick]
        self.total -= size
        return size

    def items(self) -> Iterator[tuple[Hashable, int]]:
        for group in self._groups.values():
            yield from reversed(group.items())

    def __contains__(self, key: object) -> bool:
        return key in self._tick_of

    def __len__(self) -> int:
        return len(self._tick_of)
