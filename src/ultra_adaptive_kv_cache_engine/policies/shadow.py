"""A shadow cache: a key-only simulation of one policy at a given capacity that scores the hits it would get."""

from __future__ import annotations

from collections.abc import Hashable

from .base import EvictionPolicy


class ShadowCache:
    """Replays the events a store sees through `policy` as if it alone ran a cache of `capacity` units.

    `touch(key, size, tick, weight)` is one reference: a hit adds `weight * size` to `score` unless an
    earlier reference of the same tick missed (the prefix rule: one tick is one request, walked root
    first); a miss inserts the key, evicting the policy's victims until it fits. Holds keys and sizes only.
    Invariant: `used` is the sum of the sizes held and stays <= capacity after every touch (a key larger
    than the capacity is not held).
    """

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.policy = policy
        self.capacity = capacity
        self.used = 0
        self.score = 0.0
        self._size: dict[Hashable, int] = {}
        self._missed_tick: float | None = None

    def touch(self, key: Hashable, size: int, tick: float, weight: float) -> None:
        sizes, policy = self._size, self.policy
        if key in sizes:
            policy.on_access(key)
            if tick != self._missed_tick:
                self.score += weight * size
            return
        self._missed_tick = tick
        capacity = self.capacity
        if size > capacity:
            return
        used = self.used
        while used + size > capacity:
            (victim,) = policy.victims(1)
            policy.on_remove(victim)
            used -= sizes.pop(victim)
        policy.on_insert(key, size)
        sizes[key] = size
        self.used = used + size

    def __contains__(self, key: object) -> bool:
        return key in self._size
