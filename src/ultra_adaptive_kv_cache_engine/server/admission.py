"""`Admission`: how many requests the server has in flight, and the 429 beyond `max_queue`.

A request is admitted before it reaches the engine and holds one `Ticket` until its response is complete (or
its client is gone). A ticket is waiting until the request's first generated step, running afterwards; the
two counts are the `uakv:num_requests_waiting` / `running` gauges, and the ticket times the request's first
token, the steps between tokens and its whole life. Everything runs on the server's event loop (no lock);
the clock is injected.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .errors import queue_full
from .metrics import ServerMetrics


class Admission:
    """Admits at most `limit` requests at once; `retry_after_s` goes into the 429's Retry-After."""

    def __init__(self, limit: int, retry_after_s: int, metrics: ServerMetrics,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit, self.retry_after_s, self.metrics, self.clock = limit, retry_after_s, metrics, clock
        self.waiting = 0
        self.running = 0

    @property
    def in_flight(self) -> int:
        return self.waiting + self.running

    def admit(self) -> Ticket:
        """A ticket for one more request; APIError 429 when `limit` requests are already in flight."""
        if self.in_flight >= self.limit:
            raise queue_full(self.in_flight, self.limit, self.retry_after_s)
        self.waiting += 1
        self.metrics.waiting.inc()
        return Ticket(self)


class Ticket:
    """One admitted request (see the module docstring). `release` is idempotent."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.start = self.last = admission.clock()
        self.tokens = 0
        self.running = False
        self.released = False

    def step(self, completion_tokens: int) -> None:
        """The engine produced a step; `completion_tokens` counts every token generated so far."""
        a, now = self.admission, self.admission.clock()
        if not self.running:
            self.running = True
            a.waiting, a.running = a.waiting - 1, a.running + 1
            a.metrics.waiting.dec()
            a.metrics.running.inc()
            a.metrics.ttft.observe(now - self.start)
        elif completion_tokens > self.tokens:
            a.metrics.itl.observe((now - self.last) / (completion_tokens - self.tokens))
        self.tokens, self.last = max(self.tokens, completion_tokens), now

    def finish(self, reason: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        """The request ended (`reason`: stop, length or cancelled); releases the ticket."""
        metrics = self.admission.metrics
        metrics.record_finished(reason, prompt_tokens, cached_tokens, completion_tokens)
        metrics.e2e.observe(self.admission.clock() - self.start)
        self.release()

    def fail(self, status: int) -> None:
        """The request ended with an error answer (`status`); releases the ticket."""
        self.admission.metrics.record_error(status)
        self.release()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        a = self.admission
        if self.running:
            a.running -= 1
            a.metrics.running.dec()
        else:
            a.waiting -= 1
            a.metrics.waiting.dec()
