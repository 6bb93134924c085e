"""Least recently used."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from .base import Clock, EvictionPolicy, first_keys


class LRUPolicy(EvictionPolicy):
    """Evicts the key whose last insert or access is oldest. O(1) per event."""

    name = "lru"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victims(self, n: int) -> list[Hashable]:
        return first_keys(self._order, n)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, key: object) -> bool:
        return key in self._order
