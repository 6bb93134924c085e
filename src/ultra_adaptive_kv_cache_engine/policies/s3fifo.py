"""S3-FIFO (Yang et al., SOSP 2023): a small FIFO, a main FIFO and a ghost FIFO, in size units."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from .base import Clock, EvictionPolicy
from .ghost import GhostList

SMALL_SHARE = 0.1  # the paper's split: S holds 10% of the capacity, M the other 90%
MAX_FREQ = 3  # the paper's two-bit capped counter


class S3FIFOPolicy(EvictionPolicy):
    """Small queue S (10% of c), main queue M, ghost G (keys evicted from S, bounded to 90% of c).

    - insert of a new key: into S, or into M if it is in G (a ghost hit); its counter starts at 0;
    - access (or insert of a tracked key): counter + 1, capped at 3;
    - eviction, one victim at a time: while S holds at least 10% of c (or M is empty) take S's oldest key:
      accessed since insert -> moved to M with its counter cleared, else it is the victim; otherwise take
      M's oldest: counter > 0 -> reinserted at M's newest end with counter - 1, else it is the victim.
    `victims(n)` performs these moves (they are the policy's own bookkeeping) and parks the chosen keys,
    still tracked, in a pending queue that later calls return first. An access to a pending key returns it
    to M. A pending key taken from S goes to G when the store removes it. c is `capacity`, or when None the
    largest total size ever tracked. O(1) amortised per event (every reinsertion spends one access).
    """

    name = "s3fifo"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._small: OrderedDict[Hashable, int] = OrderedDict()  # key -> size, oldest first
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._pending: OrderedDict[Hashable, bool] = OrderedDict()  # victim -> taken from S
        self._size: dict[Hashable, int] = {}
        self._freq: dict[Hashable, int] = {}
        self._ghost = GhostList()
        self._small_total = 0
        self._main_total = 0
        self._high_water = 0
        self.small_share = SMALL_SHARE

    @property
    def target_capacity(self) -> int:
        return self.capacity if self.capacity is not None else max(1, self._high_water)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        if key in self._size:
            self._resize(key, size)
            self.on_access(key)
            return
        self._size[key] = size
        self._freq[key] = 0
        if self._returns_to_main(key, size):
            self._main[key] = size
            self._main_total += size
        else:
            self._small[key] = size
            self._small_total += size
        self._high_water = max(self._high_water, self._small_total + self._main_total)

    def on_access(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is None:
            return
        self._freq[key] = min(MAX_FREQ, freq + 1)
        if self._pending.pop(key, None) is not None:
            self._main[key] = self._size[key]
            self._main_total += self._size[key]

    def on_remove(self, key: Hashable) -> None:
        size = self._size.pop(key, None)
        if size is None:
            return
        del self._freq[key]
        from_small = self._pending.pop(key, None)
        if from_small is not None:
            if from_small:
                self._ghost.add(key, size)
                self._ghost.trim((1.0 - self.small_share) * self.target_capacity)
        elif self._small.pop(key, None) is not None:
            self._small_total -= size
        else:
            del self._main[key]
            self._main_total -= size

    def victims(self, n: int) -> list[Hashable]:
        out = [key for key, _ in zip(self._pending, range(n), strict=False)]
        small_floor = self.small_share * self.target_capacity
        while len(out) < n and (self._small or self._main):
            if self._small and (self._small_total >= small_floor or not self._main):
                victim = self._evict_small()
            else:
                victim = self._evict_main()
            if victim is not None:
                out.append(victim)
        return out

    def _returns_to_main(self, key: Hashable, size: int) -> bool:
        """Whether a new key goes straight to M: it is a ghost (evicted from S, now back)."""
        return self._ghost.pop(key) is not None

    def _evict_small(self) -> Hashable | None:
        key, size = self._small.popitem(last=False)
        self._small_total -= size
        if self._freq[key] > 0:
            self._freq[key] = 0
            self._main[key] = size
            self._main_total += size
            return None
        self._pending[key] = True
        return key

    def _evict_main(self) -> Hashable | None:
        key, size = self._main.popitem(last=False)
        if self._freq[key] > 0:
            self._freq[key] -= 1
            self._main[key] = size
            return None
        self._main_total -= size
        self._pending[key] = False
        return key

    def _resize(self, key: Hashable, size: int) -> None:
        old = self._size[key]
        self._size[key] = size
        if key in self._small:
            self._small[key] = size
            self._small_total += size - old
        elif key in self._main:
            self._main[key] = size
            self._main_total += size - old

    def queues(self) -> tuple[list[Hashable], list[Hashable], list[Hashable]]:
        """(S, M, G) keys, oldest first: for inspection and tests."""
        return list(self._small), list(self._main), list(self._ghost)

    def __len__(self) -> int:
        return len(self._size)

    def __contains__(self, key: object) -> bool:
        return key in self._size
