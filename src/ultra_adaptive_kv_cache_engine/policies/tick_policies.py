"""Tick-ordered experts of the adaptive policy: LRU and ARC whose lists leave leaves first (see `TickList`)."""

from __future__ import annotations

from collections.abc import Hashable

from .arc import ARCPolicy
from .base import Clock, EvictionPolicy, first_keys
from .recency import SizedOrder
from .tick_order import TickList


class TickLRUPolicy(EvictionPolicy):
    """LRU over `TickList`: oldest tick first, the last touched first within a tick (leaves before roots)."""

    name = "tick-lru"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._order = TickList(self.clock)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        self._order.touch(key, size)

    def on_access(self, key: Hashable) -> None:
        size = self._order.pop(key)
        if size is not None:
            self._order.touch(key, size)

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key)

    def victims(self, n: int) -> list[Hashable]:
        if n == 1 and len(self._order):
            return [self._order.first()]
        return first_keys((key for key, _ in self._order.items()), n)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order


class TickARCPolicy(ARCPolicy):
    """ARC whose lists leave in tick order (see `TickList`)."""

    name = "tick-arc"

    def _new_list(self) -> SizedOrder:
        return TickList(self.clock)
