"""Sized recency lists: the building block of ARC-style policies (which key of a list leaves first)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Protocol


class SizedOrder(Protocol):
    """Keys with sizes in eviction order. `total` is the sum of the sizes held; a key is held at most once."""

    total: int

    def touch(self, key: Hashable, size: int) -> None: ...

    def pop(self, key: Hashable) -> int | None: ...

    def items(self) -> Iterator[tuple[Hashable, int]]: ...

    def __contains__(self, key: object) -> bool: ...

    def __len__(self) -> int: ...


class RecencyList:
    """Least recently touched first: `touch` moves a key (with its new size) to the most recent end.

    O(1) per touch and pop; `items()` yields (key, size) from the least recently touched.
    """

    def __init__(self) -> None:
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self.total = 0

    def touch(self, key: Hashable, size: int) -> None:
        old = self._sizes.pop(key, None)
        if old is not None:
            self.total -= old
        self._sizes[key] = size
        self.total += size

    def pop(self, key: Hashable) -> int | None:
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total -= size
        return size

    def items(self) -> Iterator[tuple[Hashable, int]]:
        return iter(self._sizes.items())

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)
