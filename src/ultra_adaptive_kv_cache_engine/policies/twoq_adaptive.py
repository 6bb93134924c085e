"""2Q with a long ghost as doorkeeper and a probation share that adapts on ghost hits near the eviction point."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from .base import Clock, EvictionPolicy
from .tick_order import TickList

INITIAL_SHARE = 0.1  # probation's first target share of c (S3-FIFO's split)
MIN_SHARE = 0.01
MAX_SHARE = 0.9
GHOST_CAPACITIES = 4.0  # the probation ghost remembers keys of this many capacities: second sightings far apart
MAIN_GHOST_CAPACITIES = 1.0
WINDOW = 0.25  # a ghost hit moves the share only if the key left its queue within this share of c


class StampedGhost:
    """Evicted keys with their sizes and the queue's eviction count (in size units) when each left.

    Invariant: `total` is the sum of the sizes held; `evicted` only grows; `add` then `trim(limit)` keeps
    the newest keys whose sizes sum to at most `limit`. O(1) amortised per call.
    """

    def __init__(self) -> None:
        self._keys: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()  # key -> (size, stamp), oldest first
        self.total = 0
        self.evicted = 0

    def add(self, key: Hashable, size: int, limit: float) -> None:
        self.evicted += size
        self._keys[key] = (size, self.evicted)
        self.total += size
        while self.total > limit and self._keys:
            _, (old, _) = self._keys.popitem(last=False)
            self.total -= old

    def pop(self, key: Hashable) -> int | None:
        """How many size units left the queue after `key` did (0: it was the last); None if not held."""
        entry = self._keys.pop(key, None)
        if entry is None:
            return None
        self.total -= entry[0]
        return self.evicted - entry[1]

    def __contains__(self, key: object) -> bool:
        return key in self._keys


def twoq_victims(probation: TickList, main: TickList, floor: float, n: int) -> list[Hashable]:
    """The first `n` victims of 2Q: probation's first while it holds at least `floor` units (or main is
    empty), else main's first. Changes nothing."""
    if n == 1 and (len(probation) or len(main)):  # the common ask (one slot at a time): no iterators
        if len(probation) and (probation.total >= floor or not len(main)):
            return [probation.first()]
        return [main.first()]
    out: list[Hashable] = []
    p_items, m_items = probation.items(), main.items()
    p_total = probation.total
    p_left, m_left = len(probation), len(main)
    while len(out) < n and (p_left or m_left):
        if p_left and (p_total >= floor or not m_left):
            key, size = next(p_items)
            p_total -= size
            p_left -= 1
        else:
            key, _ = next(m_items)
            m_left -= 1
        out.append(key)
    return out


class TwoQAdaptivePolicy(EvictionPolicy):
    """Probation P (keys seen once), protected M (keys seen again), ghosts GP and GM, all in size units.

    - insert of a new key: into M if it is in GP or GM (it came back: a second sighting), else into P; a
      key back from GP that left P within the last ``WINDOW * c`` units evicted from P grows the share s
      by ``size / c`` (P was just too short); one back from GM within ``WINDOW * c`` of M's evictions
      shrinks s by as much (M was); s stays in [0.01, 0.9], starting at 0.1;
    - access (or insert of a tracked key): a key in P moves to M; a key in M is touched;
    - victims: P's first while P holds at least ``s * c`` (or M is empty), else M's first. P and M are
      tick-ordered (`TickList`): oldest request first and, within one request, its deepest block first;
    - a victim removed from P goes to GP, bounded to 4c (second sightings of a conversation come hundreds
      of requests later: GP is the doorkeeper that tells them apart from one-off prompts); one removed
      from M goes to GM, bounded to c.
    c is `capacity`, or when None the largest total size tracked so far. O(1) amortised per event;
    `victims(n)` is O(n) and changes nothing.
    """

    name = "twoq_adaptive"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._probation = TickList(self.clock)
        self._main = TickList(self.clock)
        self._probation_ghost = StampedGhost()
        self._main_ghost = StampedGhost()
        self._size: dict[Hashable, int] = {}
        self._high_water = 0
        self.share = INITIAL_SHARE

    @property
    def target_capacity(self) -> int:
        return self.capacity if self.capacity is not None else max(1, self._high_water)

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        if key in self._size:
            self._size[key] = size
            self._touch(key, size)
            return
        self._size[key] = size
        since = self._probation_ghost.pop(key)
        if since is not None:
            c = self.target_capacity
            if since <= WINDOW * c:
                self.share = min(MAX_SHARE, self.share + size / c)
            self._main.add(key, size)
        elif (since := self._main_ghost.pop(key)) is not None:
            c = self.target_capacity
            if since <= WINDOW * c:
                self.share = max(MIN_SHARE, self.share - size / c)
            self._main.add(key, size)
        else:
            self._probation.add(key, size)
        if self.capacity is None:  # c is the largest total tracked so far
            self._high_water = max(self._high_water, self._probation.total + self._main.total)

    def on_access(self, key: Hashable) -> None:
        size = self._size.get(key)
        if size is not None:
            self._touch(key, size)

    def _touch(self, key: Hashable, size: int) -> None:
        self._probation.pop(key)
        self._main.touch(key, size)

    def on_remove(self, key: Hashable) -> None:
        size = self._size.pop(key, None)
        if size is None:
            return
        self._forget(key)
        c = self.target_capacity
        if self._probation.pop(key) is not None:
            self._probation_ghost.add(key, size, GHOST_CAPACITIES * c)
        else:
            self._main.pop(key)
            self._main_ghost.add(key, size, MAIN_GHOST_CAPACITIES * c)

    def _forget(self, key: Hashable) -> None:
        """Hook: `key` leaves the policy (subclasses drop what they keep per key)."""

    def victims(self, n: int) -> list[Hashable]:
        return twoq_victims(self._probation, self._main, self.share * self.target_capacity, n)

    def queues(self) -> tuple[list[Hashable], list[Hashable]]:
        """(P, M) keys in eviction order: for inspection and tests."""
        return [k for k, _ in self._probation.items()], [k for k, _ in self._main.items()]

    def __len__(self) -> int:
        return len(self._size)

    def __contains__(self, key: object) -> bool:
        return key in self._size
