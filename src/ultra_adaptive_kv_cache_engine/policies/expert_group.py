"""Separate expert policies fed the same events: the adaptive policy's real experts when not fused."""

from __future__ import annotations

from collections.abc import Hashable

from .base import Clock, EvictionPolicy


class ExpertGroup:
    """One instance of each class in `classes`, each told every event; `victims(i, n)` is expert i's answer.

    Invariant: every expert tracks exactly the keys of `sizes` (the keys inserted and not removed). The
    cost of an event is the sum of the experts' (see `TwoQFamily` for the fused default line-up).
    """

    def __init__(self, classes: tuple[type[EvictionPolicy], ...], capacity: int | None, clock: Clock) -> None:
        self.classes = classes
        self.experts = [cls(capacity, clock) for cls in classes]
        self.names = tuple(e.name for e in self.experts)
        self.sizes: dict[Hashable, int] = {}
        # bound methods, looked up once: every event goes to every expert
        self._inserts = tuple(e.on_insert for e in self.experts)
        self._accesses = tuple(e.on_access for e in self.experts)
        self._removes = tuple(e.on_remove for e in self.experts)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        self.sizes[key] = size
        for insert in self._inserts:
            insert(key, size)

    def on_access(self, key: Hashable) -> None:
        if key in self.sizes:
            for access in self._accesses:
                access(key)

    def on_remove(self, key: Hashable) -> None:
        if self.sizes.pop(key, None) is not None:
            for remove in self._removes:
                remove(key)

    def victims(self, expert: int, n: int) -> list[Hashable]:
        return self.experts[expert].victims(n)

    def __len__(self) -> int:
        return len(self.sizes)
