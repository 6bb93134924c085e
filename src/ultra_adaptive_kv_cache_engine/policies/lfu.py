"""Least frequently used, ties broken by recency (the least recently used of the rarest goes first)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from .base import Clock, EvictionPolicy


class _FreqNode:
    """One frequency class: its keys in the order they reached it (oldest first); a doubly linked node."""

    __slots__ = ("freq", "keys", "prev", "next")

    def __init__(self, freq: int) -> None:
        self.freq = freq
        self.keys: OrderedDict[Hashable, None] = OrderedDict()
        self.prev: _FreqNode = self
        self.next: _FreqNode = self


class LFUPolicy(EvictionPolicy):
    """Evicts the key with the fewest accesses since its insert; among equals the least recently touched.

    A new key has frequency 1; each access (or insert of a tracked key) adds 1. A removed key is forgotten.
    O(1) per event (a linked list of frequency classes, ascending, as Shah, Mitra and Matani's LFU);
    `victims(n)` is O(n + number of classes visited).
    """

    name = "lfu"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._head = _FreqNode(0)  # sentinel: head.next is the rarest class
        self._node_of: dict[Hashable, _FreqNode] = {}

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        if key in self._node_of:
            self.on_access(key)
            return
        first = self._head.next
        if first is self._head or first.freq != 1:
            first = self._link_after(self._head, 1)
        first.keys[key] = None
        self._node_of[key] = first

    def on_access(self, key: Hashable) -> None:
        node = self._node_of.get(key)
        if node is None:
            return
        nxt = node.next
        if nxt is self._head or nxt.freq != node.freq + 1:
            nxt = self._link_after(node, node.freq + 1)
        del node.keys[key]
        nxt.keys[key] = None
        self._node_of[key] = nxt
        if not node.keys:
            self._unlink(node)

    def on_remove(self, key: Hashable) -> None:
        node = self._node_of.pop(key, None)
        if node is None:
            return
        del node.keys[key]
        if not node.keys:
            self._unlink(node)

    def victims(self, n: int) -> list[Hashable]:
        out: list[Hashable] = []
        node = self._head.next
        while node is not self._head and len(out) < n:
            for key in node.keys:
                if len(out) >= n:
                    break
                out.append(key)
            node = node.next
        return out

    def frequency(self, key: Hashable) -> int:
        """Accesses counted for `key` (0 if not tracked)."""
        node = self._node_of.get(key)
        return node.freq if node is not None else 0

    def __len__(self) -> int:
        return len(self._node_of)

    def __contains__(self, key: object) -> bool:
        return key in self._node_of

    @staticmethod
    def _link_after(node: _FreqNode, freq: int) -> _FreqNode:
        new = _FreqNode(freq)
        new.prev, new.next = node, node.next
        node.next.prev = new
        node.next = new
        return new

    @staticmethod
    def _unlink(node: _FreqNode) -> None:
        node.prev.next = node.next
        node.next.prev = node.prev
