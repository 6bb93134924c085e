"""Belady's offline optimum (MIN) for prefix-chained block traces, under the replay's live rules.

Definition used here. The trace is flattened into one access sequence: request by request, each request's
blocks root first. The next use of an access is the position of the next access to the same block (never:
+infinity); every block of a request is used at that request, hit or not. The replay (see `simulator`)
gives every missed block of a request a slot before naming any, as a live paged cache does; when it must
evict, MIN's victims are the cached blocks, not pinned by the request in flight, whose next use is
furthest. `admit` refuses a block only when the cache is full and every cached block is needed sooner;
the replay asks after making room, so it admits every block, and a block needed late is simply the first
victim later (at least as good as leaving its slot unnamed, which would be reused before any choice).

Why this respects the prefix rule: a block is always preceded by its parent in any request that has it,
so a parent's next use comes before its child's: MIN never evicts a parent while keeping a child that will
be used sooner than the parent, and every block it keeps is reachable; the parents of the pinned blocks
are pinned too. Furthest-next-use is the classical optimum for one access at a time; with a request's
blocks pinned together its optimality is not proven here, and the tests check that it bounds every
registered policy on the synthetic workloads. The token hit rate is that of the same schedule (a partial
last block counts its own tokens).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence

from ..base import Clock, EvictionPolicy

NEVER = float("inf")


def next_uses(requests: Sequence[Sequence[Hashable]]) -> list[list[float]]:
    """For each request and block, the flat position of that block's next access (NEVER if none).

    Positions count blocks over the whole trace in replay order; computed once per trace in one backward pass.
    """
    total = sum(len(r) for r in requests)
    last: dict[Hashable, float] = {}
    out: list[list[float]] = [[] for _ in requests]
    pos = total
    for index in range(len(requests) - 1, -1, -1):
        keys = requests[index]
        row = [NEVER] * len(keys)
        for i in range(len(keys) - 1, -1, -1):
            pos -= 1
            row[i] = last.get(keys[i], NEVER)
            last[keys[i]] = pos
        out[index] = row
    return out


class BeladyPolicy(EvictionPolicy):
    """The offline oracle behind the policy interface; the replay tells it each key's next use.

    `set_next_use(key, when)` must precede the insert or access of `key` (and is also called for cached
    blocks a request skips). Invariant: `_next[key]` is the next use of each tracked key; the heap holds
    (-next use, seq, key) entries and only the latest seq of a key is live. O(log n) amortised per event.
    """

    name = "belady"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._next: dict[Hashable, float] = {}
        self._size: dict[Hashable, int] = {}
        self._heap: list[tuple[float, int, Hashable]] = []
        self._seq = 0
        self._seq_of: dict[Hashable, int] = {}
        self._total = 0
        self._upcoming: dict[Hashable, float] = {}

    def set_next_use(self, key: Hashable, when: float) -> None:
        if key in self._next:
            self._push(key, when)
        else:
            self._upcoming[key] = when

    def admit(self, key: Hashable, size: int = 1) -> bool:
        if self.capacity is None or self._total + size <= self.capacity:
            return True
        furthest = self._peek()
        return furthest is not None and self._next[furthest] > self._upcoming.get(key, NEVER)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        self._total += size - self._size.get(key, 0)
        self._size[key] = size
        self._push(key, self._upcoming.pop(key, self._next.get(key, NEVER)))

    def on_access(self, key: Hashable) -> None:
        return None  # the next use was already set by set_next_use

    def on_remove(self, key: Hashable) -> None:
        if self._next.pop(key, None) is not None:
            del self._seq_of[key]
            self._total -= self._size.pop(key)

    def victims(self, n: int) -> list[Hashable]:
        out: list[Hashable] = []
        while len(out) < n and self._peek() is not None:
            _, _, key = heapq.heappop(self._heap)
            out.append(key)
        for key in out:
            self._push(key, self._next[key])
        return out

    def __len__(self) -> int:
        return len(self._next)

    def __contains__(self, key: object) -> bool:
        return key in self._next

    def _push(self, key: Hashable, when: float) -> None:
        self._next[key] = when
        self._seq += 1
        self._seq_of[key] = self._seq
        heapq.heappush(self._heap, (-when, self._seq, key))
        if len(self._heap) > 4 * len(self._next) + 1024:  # drop stale entries: keeps the heap O(tracked)
            self._heap = [(-self._next[k], s, k) for k, s in self._seq_of.items()]
            heapq.heapify(self._heap)

    def _peek(self) -> Hashable | None:
        """The tracked key with the furthest next use, dropping stale heap entries on the way."""
        heap = self._heap
        while heap:
            _, seq, key = heap[0]
            if self._seq_of.get(key) == seq:
                return key
            heapq.heappop(heap)
        return None
