"""`FreeBlockQueue`: an intrusive doubly-linked list of free block ids, in eviction order.

The links live in two int lists indexed by block id (`_prev`, `_next`) plus one sentinel slot at index
`num_blocks`, so every operation is O(1) and allocates nothing. The head (`popleft`) is the next block to
be reused, i.e. evicted if it still holds cached content; the tail is reused last.
"""

from __future__ import annotations

from collections.abc import Iterator

_DETACHED = -1


class FreeBlockQueue:
    """Free block ids in eviction order.

    Invariants: each id in ``range(num_blocks)`` is in the queue at most once; ``len(self)`` is the number
    of ids in it; iteration goes from the head (evicted first) to the tail. A new queue holds every id in
    ascending order.
    """

    __slots__ = ("_len", "_next", "_num_blocks", "_prev", "_sentinel")

    def __init__(self, num_blocks: int, *, filled: bool = True) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks={num_blocks!r} must be a non-negative integer")
        self._num_blocks = num_blocks
        self._sentinel = num_blocks
        self._prev = [_DETACHED] * (num_blocks + 1)
        self._next = [_DETACHED] * (num_blocks + 1)
        self._prev[num_blocks] = self._next[num_blocks] = num_blocks  # empty circular list
        self._len = 0
        if filled:
            for block_id in range(num_blocks):
                self.append(block_id)

    def __len__(self) -> int:
        return self._len

    def __contains__(self, block_id: object) -> bool:
        return (
            type(block_id) is int
            and 0 <= block_id < self._num_blocks
            and self._next[block_id] != _DETACHED
        )

    def __iter__(self) -> Iterator[int]:
        node = self._next[self._sentinel]
        while node != self._sentinel:
            yield node
            node = self._next[node]

    def peek(self) -> int | None:
        """The head (next block to be reused) without removing it; None if empty."""
        head = self._next[self._sentinel]
        return None if head == self._sentinel else head

    def popleft(self) -> int | None:
        """Removes and returns the head; None if the queue is empty."""
        nxt, sentinel = self._next, self._sentinel
        head = nxt[sentinel]
        if head == sentinel:
            return None
        after = nxt[head]
        nxt[sentinel] = after
        self._prev[after] = sentinel
        nxt[head] = self._prev[head] = _DETACHED
        self._len -= 1
        return head

    def popleft_many(self, n: int) -> list[int] | None:
        """Removes and returns the first `n` ids in order; None (and no change) if fewer are queued."""
        if n > self._len:
            return None
        nxt, prev, sentinel = self._next, self._prev, self._sentinel
        out: list[int] = []
        node = nxt[sentinel]
        for _ in range(n):
            out.append(node)
            after = nxt[node]
            nxt[node] = prev[node] = _DETACHED
            node = after
        nxt[sentinel] = node
        prev[node] = sentinel
        self._len -= n
        return out

    def append(self, block_id: int) -> None:
        """Puts `block_id` at the tail (reused last). ValueError if it is already queued or out of range."""
        nxt, prev = self._next, self._prev
        if type(block_id) is not int or not 0 <= block_id < self._num_blocks or nxt[block_id] != _DETACHED:
            self._raise_not_insertable(block_id)
        sentinel = self._sentinel
        before = prev[sentinel]
        prev[block_id] = before
        nxt[block_id] = sentinel
        nxt[before] = block_id
        prev[sentinel] = block_id
        self._len += 1

    def appendleft(self, block_id: int) -> None:
        """Puts `block_id` at the head (reused next). ValueError if it is already queued or out of range."""
        nxt, prev = self._next, self._prev
        if type(block_id) is not int or not 0 <= block_id < self._num_blocks or nxt[block_id] != _DETACHED:
            self._raise_not_insertable(block_id)
        sentinel = self._sentinel
        after = nxt[sentinel]
        prev[block_id] = sentinel
        nxt[block_id] = after
        nxt[sentinel] = block_id
        prev[after] = block_id
        self._len += 1

    def remove(self, block_id: int) -> None:
        """Takes `block_id` out of the queue wherever it is. ValueError if it is not queued."""
        if block_id not in self:
            raise ValueError(f"block {block_id!r} is not in the free queue")
        prev, nxt = self._prev, self._next
        before, after = prev[block_id], nxt[block_id]
        nxt[before] = after
        prev[after] = before
        prev[block_id] = nxt[block_id] = _DETACHED
        self._len -= 1

    def _raise_not_insertable(self, block_id: object) -> None:
        if type(block_id) is not int or not 0 <= block_id < self._num_blocks:
            raise ValueError(f"block id {block_id!r} is out of range; expected an int in [0, {self._num_blocks})")
        raise ValueError(f"block {block_id} is already in the free queue")
