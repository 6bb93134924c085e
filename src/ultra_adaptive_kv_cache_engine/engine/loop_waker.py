"""`LoopWaker`: wakes asyncio consumers from the step thread, one event-loop wake-up per step, not per stream.

A consumer waiting for its stream's next chunk awaits a future; the step thread sets it through
`loop.call_soon_threadsafe`, which writes to the loop's self-pipe (a system call that releases the GIL, and so
lets the event loop take it in the middle of the step). Inside `batch()` the wake-ups are held, and at its end
each event loop gets ONE callback that sets all of its futures: a step of 64 streams costs one system call and
one hand-over of the GIL, not 64. Outside a batch a wake-up is sent at once.

When a loop is closed (nobody will read), the `on_dead` callbacks of the futures it held are called on the
step thread, so their requests are cancelled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

OnDead = Callable[[], None]
Held = dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[None], OnDead]]]


def _set_all(waiters: list[tuple[asyncio.Future[None], OnDead]]) -> None:
    for waiter, _ in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _send(loop: asyncio.AbstractEventLoop, waiters: list[tuple[asyncio.Future[None], OnDead]]) -> bool:
    try:
        loop.call_soon_threadsafe(_set_all, waiters)
    except RuntimeError:  # the loop is closed: nobody will read these streams
        return False
    return True


class LoopWaker:
    """Sets futures of any event loop from another thread, batched per loop inside `batch()` (see the module
    docstring). Thread-safe; batches are not nested (the step thread opens one per step)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Held | None = None

    def wake(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], on_dead: OnDead) -> bool:
        """Sets `waiter` on `loop` (at the end of the open batch, if any). False when it was sent at once and
        the loop is closed (`on_dead` is then not called: the caller acts on the False)."""
        with self._lock:
            if self._held is not None:
                self._held.setdefault(loop, []).append((waiter, on_dead))
                return True
        return _send(loop, [(waiter, on_dead)])

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Holds the wake-ups made inside; sends them at the end, one callback per event loop."""
        with self._lock:
            if self._held is not None:
                raise RuntimeError("LoopWaker.batch() is already open")
            self._held = {}
        try:
            yield
        finally:
            with self._lock:
                held, self._held = self._held, None
            for loop, waiters in held.items():
                if not _send(loop, waiters):
                    for _, on_dead in waiters:
                        on_dead()
