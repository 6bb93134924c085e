"""A ghost list: keys recently evicted (no values), with their sizes, oldest first."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator


class GhostList:
    """Remembers evicted keys and their sizes in eviction order; `trim(limit)` forgets the oldest.

    Invariant: `total` is the sum of the sizes of the keys held; a key is held at most once (adding it
    again moves it to the newest end with its new size).
    """

    def __init__(self) -> None:
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self.total = 0

    def add(self, key: Hashable, size: int) -> None:
        self.pop(key)
        self._sizes[key] = size
        self.total += size

    def pop(self, key: Hashable) -> int | None:
        """Forget `key`; its size, or None if it was not held."""
        size = self._sizes.pop(key, None)
        if size is not None:
            self.total -= size
        return size

    def trim(self, limit: float) -> None:
        """Forget the oldest keys until `total <= limit`."""
        while self.total > limit and self._sizes:
            _, size = self._sizes.popitem(last=False)
            self.total -= size

    def __contains__(self, key: object) -> bool:
        return key in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._sizes)
