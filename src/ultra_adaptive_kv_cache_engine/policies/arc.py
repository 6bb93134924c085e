"""ARC: Adaptive Replacement Cache (Megiddo and Modha, FAST 2003), in size units."""

from __future__ import annotations

from collections.abc import Hashable

from .base import Clock, EvictionPolicy
from .ghost import GhostList
from .recency import RecencyList, SizedOrder


class ARCPolicy(EvictionPolicy):
    """Two recency lists, T1 (seen once since insert) and T2 (seen again), and their ghosts B1 and B2.

    - insert of a new key: T1; of a key in B1 (or B2): T2, and the target size `p` of T1 grows (shrinks) by
      the key's size times max(1, |B2|/|B1|) (resp. max(1, |B1|/|B2|)), bounded to [0, c];
    - access (or insert of a tracked key): the key moves to the most recent end of T2;
    - victims: from T1's least recent end while T1's remaining size exceeds `p` (or T2 is exhausted), else
      from T2's; a victim that the store then removes goes to the ghost of its list;
    - ghosts are trimmed so that |T1| + |B1| <= c and |T1| + |T2| + |B1| + |B2| <= 2c.
    Sizes are in the store's units; c is `capacity`, or when None the largest total size ever tracked.
    O(1) per event; `victims(n)` is O(n) and does not reorder anything.
    Subclasses choose the lists' order through `_new_list()`.
    """

    name = "arc"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._t1: SizedOrder = self._new_list()
        self._t2: SizedOrder = self._new_list()
        self._b1 = GhostList()
        self._b2 = GhostList()
        self._pending: set[Hashable] = set()  # returned by victims, not touched since
        self._high_water = 0
        self.p = 0.0

    def _new_list(self) -> SizedOrder:
        return RecencyList()

    @property
    def target_capacity(self) -> int:
        """c: the capacity, or the largest total size tracked so far (at least 1)."""
        return self.capacity if self.capacity is not None else max(1, self._high_water)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        if key in self._t1 or key in self._t2:
            self._t1.pop(key)
            self._t2.pop(key)
            self._t2.touch(key, size)
            self._pending.discard(key)
            return
        c = self.target_capacity
        if key in self._b1:
            self.p = min(float(c), self.p + size * max(1.0, self._b2.total / max(1, self._b1.total)))
            self._b1.pop(key)
            self._t2.touch(key, size)
        elif key in self._b2:
            self.p = max(0.0, self.p - size * max(1.0, self._b1.total / max(1, self._b2.total)))
            self._b2.pop(key)
            self._t2.touch(key, size)
        else:
            self._t1.touch(key, size)
        self._high_water = max(self._high_water, self._t1.total + self._t2.total)
        self._trim_ghosts()

    def on_access(self, key: Hashable) -> None:
        size = self._t1.pop(key)
        if size is None:
            size = self._t2.pop(key)
            if size is None:
                return
        self._t2.touch(key, size)
        self._pending.discard(key)

    def on_remove(self, key: Hashable) -> None:
        was_victim = key in self._pending
        self._pending.discard(key)
        size = self._t1.pop(key)
        if size is not None:
            if was_victim:
                self._b1.add(key, size)
        else:
            size = self._t2.pop(key)
            if size is not None and was_victim:
                self._b2.add(key, size)
        self._trim_ghosts()

    def victims(self, n: int) -> list[Hashable]:
        out: list[Hashable] = []
        t1, t2 = self._t1.items(), self._t2.items()
        next1, next2 = next(t1, None), next(t2, None)
        t1_left = self._t1.total
        while len(out) < n and (next1 is not None or next2 is not None):
            if next1 is not None and (next2 is None or t1_left > self.p):
                out.append(next1[0])
                t1_left -= next1[1]
                next1 = next(t1, None)
            else:
                assert next2 is not None
                out.append(next2[0])
                next2 = next(t2, None)
        self._pending.update(out)
        return out

    def _trim_ghosts(self) -> None:
        c = self.target_capacity
        self._b1.trim(max(0, c - self._t1.total))
        self._b2.trim(max(0, 2 * c - self._t1.total - self._t2.total - self._b1.total))

    def __len__(self) -> int:
        return len(self._t1) + len(self._t2)

    def __contains__(self, key: object) -> bool:
        return key in self._t1 or key in self._t2
