"""The eviction-policy interface: small, pure, told of events, answers with victims. No I/O, no tensors."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from itertools import islice
from typing import ClassVar

Clock = Callable[[], float]


def first_keys(order: Iterable[Hashable], n: int) -> list[Hashable]:
    """The first `n` keys of an eviction order (fewer if it holds fewer); the order is not changed."""
    return list(islice(order, max(n, 0)))


class EvictionPolicy(ABC):
    """Decides which tracked keys leave first.

    Protocol (the store drives it; the policy never acts on its own):
    - `on_insert(key, size)` when the store adds a key (size in the store's units, e.g. tokens or bytes);
    - `on_access(key)` on every hit of a tracked key;
    - `victims(n)` returns up to `n` distinct tracked keys in the order they should be evicted; it may
      reorganise internal queues (e.g. S3-FIFO's second chances) but keeps every key tracked;
    - `on_remove(key)` when the store has removed a key (after evicting a victim, or an explicit delete).
      A policy with ghost history may remember keys that were returned by `victims` and then removed.
    - `admit(key, size)` is asked before an insert; False means the store should not cache the key.
    - `on_insert` of a key already tracked updates its size and counts as an access.
    - The clock: policies that group events by time (the adaptive one) read `clock()` at each event; a
      prefix store should inject a clock that reads one value per request (a request counter or its
      arrival time), so that the blocks of one request share a tick. Others ignore it.
    Capacity is in the same units as sizes; policies that need it (ARC, S3-FIFO, adaptive) use the largest
    total size tracked so far when it is None. Each event is O(1) amortised; `victims(n)` is O(n) amortised.
    Invariant: `len(policy)` equals the number of keys inserted and not yet removed.
    """

    name: ClassVar[str] = ""

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"capacity={capacity!r} must be a positive integer or None")
        self.capacity = capacity
        self.clock = clock or time.monotonic

    @abstractmethod
    def on_insert(self, key: Hashable, size: int = 1) -> None: ...

    @abstractmethod
    def on_access(self, key: Hashable) -> None: ...

    @abstractmethod
    def on_remove(self, key: Hashable) -> None: ...

    @abstractmethod
    def victims(self, n: int) -> list[Hashable]: ...

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __contains__(self, key: object) -> bool: ...

    def admit(self, key: Hashable, size: int = 1) -> bool:
        return True
