"""FreeBlockQueue: exact order after each O(1) operation, and errors that leave it unchanged."""

from __future__ import annotations

import pytest

from ultra_adaptive_kv_cache_engine.memory import FreeBlockQueue


def test_new_queue_holds_every_block_in_order():
    queue = FreeBlockQueue(11)
    assert list(queue) == list(range(11))
    assert len(queue) == 11 and queue.peek() == 0
    assert list(FreeBlockQueue(3, filled=False)) == []


def test_popleft_append_appendleft_remove_keep_exact_order():
    queue = FreeBlockQueue(5)
    assert queue.popleft() == 0
    assert queue.popleft() == 1
    assert list(queue) == [2, 3, 4]
    queue.append(0)
    queue.appendleft(1)
    assert list(queue) == [1, 2, 3, 4, 0]
    queue.remove(3)  # middle
    queue.remove(1)  # head
    queue.remove(0)  # tail
    assert list(queue) == [2, 4] and len(queue) == 2
    assert 3 not in queue and 2 in queue and "2" not in queue and 99 not in queue
    queue.append(3)
    assert list(queue) == [2, 4, 3]


def test_empty_queue_pops_none():
    queue = FreeBlockQueue(2)
    assert [queue.popleft(), queue.popleft(), queue.popleft()] == [0, 1, None]
    assert queue.peek() is None and len(queue) == 0
    queue.appendleft(1)
    assert list(queue) == [1] and queue.peek() == 1


def test_errors_leave_the_queue_unchanged():
    queue = FreeBlockQueue(4)
    queue.popleft()
    with pytest.raises(ValueError, match="block 1 is already in the free queue"):
        queue.append(1)
    with pytest.raises(ValueError, match="block 2 is already in the free queue"):
        queue.appendleft(2)
    with pytest.raises(ValueError, match="block 0 is not in the free queue"):
        queue.remove(0)
    with pytest.raises(ValueError, match=r"block id 4 is out of range; expected an int in \[0, 4\)"):
        queue.append(4)
    with pytest.raises(ValueError, match="block id True"):
        queue.append(True)
    with pytest.raises(ValueError, match="num_blocks=-1"):
        FreeBlockQueue(-1)
    assert list(queue) == [1, 2, 3] and len(queue) == 3


def test_popleft_many_is_all_or_nothing_and_keeps_links():
    queue = FreeBlockQueue(5)
    assert queue.popleft_many(2) == [0, 1]
    assert queue.popleft_many(4) is None
    assert list(queue) == [2, 3, 4] and len(queue) == 3
    queue.appendleft(0)
    queue.append(1)
    assert list(queue) == [0, 2, 3, 4, 1]
    assert queue.popleft_many(0) == []
    assert queue.popleft_many(5) == [0, 2, 3, 4, 1]
    assert list(queue) == [] and queue.peek() is None
    queue.append(3)
    assert list(queue) == [3] and 3 in queue and 0 not in queue
