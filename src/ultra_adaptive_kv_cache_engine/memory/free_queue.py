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
            isinstance(block_id, int)
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
        head = self._next[self._sentinel]
        if head == self._sentinel:
            return None
        self._unlink(head)
        return head

    def append(self, block_id: int) -> None:
        """Puts `block_id` at the tail (reused last). ValueError if it is already queued or out of range."""
        self._check_detached(block_id)
        self._link_after(self._prev[self._sentinel], block_id)

    def appendleft(self, block_id: int) -> None:
        """Puts `block_id` at the head (reused next). ValueError if it is already queued or out of range."""
        self._check_detached(block_id)
        self._link_after(self._sentinel, block_id)

    def remove(self, block_id: int) -> None:
        """Takes `block_id` out of the queue wherever it is. ValueError if it is not queued."""
        if block_id not in self:
            raise ValueError(f"block {block_id!r} is not in the free queue")
        self._unlink(block_id)

    def _check_detached(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self._num_blocks:
            raise ValueError(f"block id {block_id!r} is out of range; expected an int in [0, {self._num_blocks})")
        if self._next[block_id] != _DETACHED:
            raise ValueError(f"block {block_id} is already in the free queue")

    def _link_after(self, prev: int, block_id: int) -> None:
        nxt = self._next[prev]
        self._prev[block_id] = prev
        self._next[block_id] = nxt
        self._next[prev] = block_id
        self._prev[nxt] = block_id
        self._len += 1

    def _unlink(self, block_id: int) -> None:
        prev, nxt = self._prev[block_id], self._next[block_id]
        self._next[prev] = nxt
        self._prev[nxt] = prev
        self._prev[block_id] = self._next[block_id] = _DETACHED
        self._len -= 1
