"""`LoopWaker`: wakes asyncio consumers from the step thread, one event-loop wake-up per step, not per stream.

A consumer waiting for its stream's next chunk awaits a future; the step thread sets it through
`loop.call_soon_threadsafe`, which writes to the loop's self-pipe (a system call that releases the GIL, and so
lets the event loop take it in the middle of the step). Between `hold()` and `release()` (or inside `batch()`)
the wake-ups are held, and at the release each event loop gets ONE callback that sets all of its futures: a
step of 64 streams costs one system call and one hand-over of the GIL, not 64. Outside a hold a wake-up is
sent at once. The holder chooses when the consumers run: the step loop releases a step's wake-ups at its end,
or with `defer_wakeups` once the next step's kernels are launched (the event loop then works while the device
computes).

When a loop is closed (nobody will read), the `on_dead` callbacks of the futures it held are called on the
releasing thread, so their requests are cancelled.
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
    """Sets futures of any event loop from another thread, batched per loop while held (see the module
    docstring). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: Held | None = None

    @property
    def holding(self) -> bool:
        return self._held is not None

    def wake(self, loop: asyncio.AbstractEventLoop, waiter: asyncio.Future[None], on_dead: OnDead) -> bool:
        """Sets `waiter` on `loop` (at the release, while held). False when it was sent at once and the loop is
        closed (`on_dead` is then not called: the caller acts on the False)."""
        with self._lock:
            if self._held is not None:
                self._held.setdefault(loop, []).append((waiter, on_dead))
                return True
        return _send(loop, [(waiter, on_dead)])

    def hold(self) -> None:
        """Holds the wake-ups from now on until `release()` (a no-op while already held)."""
        with self._lock:
            if self._held is None:
                self._held = {}

    def release(self) -> None:
        """Sends the held wake-ups, one callback per event loop, and stops holding (a no-op when not held)."""
        with self._lock:
            held, self._held = self._held, None
        for loop, waiters in (held or {}).items():
            if not _send(loop, waiters):
                for _, on_dead in waiters:
                    on_dead()

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Holds the wake-ups made inside and sends them at its end (RuntimeError when already held)."""
        if self.holding:
            raise RuntimeError("LoopWaker.batch() inside a hold")
        self.hold()
        try:
            yield
        finally:
            self.release()
