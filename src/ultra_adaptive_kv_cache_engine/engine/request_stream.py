"""`ChunkStream`: one request's `StreamChunk`s, put by the step thread, read by an asyncio consumer.

The step thread calls `put` (never blocks; it wakes the consumer's event loop through a `LoopWaker`, which
the step loop batches: one wake-up per loop per step, whatever the number of streams); the consumer iterates
(`async for`). Every read takes all the chunks queued so far, merged into one (`merge_chunks`): a consumer
that fell behind catches up in one read. The stream ends after the chunk with a `finish_reason`, or raises
the exception the step thread put (a failed step), after the chunks queued before it. Closing the stream
before its end (`aclose()`, `cancel()`, or the object being collected) cancels the request; `aclose()`
returns once the step thread has ended it, so its blocks are free by then.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from .loop_waker import LoopWaker
from .sequence_state import SequenceState
from .stream import StreamChunk, merge_chunks

Item = StreamChunk | BaseException


class ChunkStream:
    """AsyncIterator[StreamChunk] of one request (see the module docstring). `state` is the request's state
    (read it after the stream ended)."""

    def __init__(self, state: SequenceState, cancel: Callable[[SequenceState], None],
                 waker: LoopWaker | None = None) -> None:
        self.state = state
        self._cancel = cancel
        self._waker = waker if waker is not None else LoopWaker()
        self._lock = threading.Lock()
        self._items: deque[Item] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.done = False  # the final chunk (or an error) was read

    # -- the step thread ----------------------------------------------------------------------------------
    def sink(self) -> Callable[[Item], bool]:
        """`put` through a weak reference: the step thread must not keep a stream alive that its consumer
        dropped (collecting it cancels the request); a dropped stream answers False."""
        ref = weakref.WeakMethod(self.put)

        def put(item: Item) -> bool:
            method = ref()
            return method(item) if method is not None else False

        return put

    def put(self, item: Item) -> bool:
        """Queues a chunk or an error; False when the consumer's event loop is gone (cancel the request)."""
        with self._lock:
            self._items.append(item)
            waiter, loop, self._waiter = self._waiter, self._loop, None
        if waiter is None or loop is None:
            return True
        return self._waker.wake(loop, waiter, self._abandoned)

    def _abandoned(self) -> None:
        """The consumer's event loop closed while it waited: nobody will read, cancel the request."""
        self._cancel(self.state)

    # -- the consumer -------------------------------------------------------------------------------------
    def __aiter__(self) -> ChunkStream:
        return self

    async def __anext__(self) -> StreamChunk:
        if self.done:
            raise StopAsyncIteration
        item = await self._get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if item.finish_reason is not None:
            self.done = True
        return item

    async def _get(self) -> Item:
        """The queued chunks merged into one (up to an error, which the next read returns), or the error."""
        while True:
            with self._lock:
                if self._items:
                    return self._take()
                loop = asyncio.get_running_loop()
                waiter = loop.create_future()
                self._waiter, self._loop = waiter, loop
            try:
                await waiter
            finally:
                with self._lock:
                    if self._waiter is waiter:
                        self._waiter = None

    def _take(self) -> Item:
        """The next item: an error alone, else every chunk queued before the next error, merged (lock held,
        at least one item queued)."""
        items = self._items
        if isinstance(items[0], BaseException) or len(items) == 1:
            return items.popleft()
        chunks: list[StreamChunk] = []
        while items and not isinstance(items[0], BaseException):
            chunks.append(items.popleft())  # type: ignore[arg-type]
        return merge_chunks(chunks)

    def cancel(self) -> None:
        """Cancels the request without waiting (no-op once the stream ended)."""
        if not self.done:
            self._cancel(self.state)

    async def aclose(self) -> None:
        """Cancels the request and waits until it ended (its KV released)."""
        if self.done:
            return
        self._cancel(self.state)
        while not self.done:
            item = await self._get()
            self.done = isinstance(item, BaseException) or item.finish_reason is not None

    def __del__(self) -> Any:
        if not getattr(self, "done", True):
            try:
                self._cancel(self.state)
            except Exception:  # interpreter shutdown: nothing left to cancel
                pass
