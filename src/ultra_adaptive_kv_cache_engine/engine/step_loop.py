"""`StepLoop`: the thread that runs the scheduler's steps and hands each request its chunks.

One step: the scheduler plans (`Scheduler.schedule`), the backend computes (`ModelBackend.execute`), the
sampler picks the sampled rows' tokens, the scheduler applies them (`Scheduler.update`), and each request's
sink gets a `StreamChunk` when its step released text or ended it. The sinks of one step are called while
`waker` holds: the streams' consumers are woken together, one event-loop wake-up per step (see `LoopWaker`).
By default a step's chunks are delivered, and their consumers woken, at the end of the step. With
`defer_wakeups` they are delivered once the NEXT step's kernels are launched (or when the loop goes idle), so
that building the chunks, calling the sinks and the event loop's HTTP writes run while the device computes.
Measured on an H200 (bench_serving --gpu, 64 streams, one run each), deferring was SLOWER: 2,004 output tok/s
against 2,469 at each step's end (the event loop then takes the GIL from the step thread while it waits on the
device, and the step thread waits for it to give it back), so it is off by default, on CUDA too. The thread sleeps while there is no work and wakes on `submit` and `cancel`.
A step that raises fails the requests it was computing (their sinks get the exception, their KV is released);
the others go on.

`on_finished(state)` is called on the step thread once per request that ended (finished, cancelled or
failed): the one place per-request figures are recorded. Keep it quick: the next step waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..metrics import LOGGER_NAME
from .loop_waker import LoopWaker
from .sampler import Sampler
from .scheduler import Scheduler, StepOutput
from .sequence_state import SequenceState
from .stream import StreamChunk

logger = logging.getLogger(LOGGER_NAME)

Sink = Callable[[StreamChunk | BaseException], bool]


class StepLoop:
    """Runs steps on one daemon thread, started at the first `submit` (see the module docstring). With
    `threaded=False` no thread is started: the caller drives `step()` / `run_until_idle()` (tests, scripts).
    `defer_wakeups`: deliver a step's chunks at the next step's launch instead of at its end."""

    def __init__(
        self, scheduler: Scheduler, sampler: Sampler | None = None,
        on_finished: Callable[[SequenceState], None] | None = None, threaded: bool = True,
        defer_wakeups: bool = False,
    ) -> None:
        self.threaded = threaded
        self.defer_wakeups = defer_wakeups
        self.scheduler = scheduler
        self.sampler = sampler if sampler is not None else Sampler()
        self.on_finished = on_finished
        self.waker = LoopWaker()  # the streams' consumers are woken through it, once per step
        self._sinks: dict[int, tuple[SequenceState, Sink]] = {}
        self._emitted: dict[int, int] = {}
        self._pending: list[StepOutput] = []  # a step's outputs not yet delivered (deferred: until the next launch)
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, state: SequenceState, sink: Sink) -> None:
        """Queues `state`; its chunks go to `sink`. QueueFullError when the waiting queue is full."""
        self._sinks[id(state)] = (state, sink)
        try:
            self.scheduler.add(state)
        except BaseException:
            del self._sinks[id(state)]
            raise
        self._notify(start=True)

    def cancel(self, state: SequenceState) -> None:
        self.scheduler.cancel(state)
        self._notify()

    def close(self) -> None:
        """Stops the thread after its current step (requests still queued are not served)."""
        with self._wakeup:
            self._closed = True
            self._wakeup.notify_all()

    def _notify(self, start: bool = False) -> None:
        with self._wakeup:
            if start and self.threaded and self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="uakv-step-loop", daemon=True)
                self._thread.start()
            self._wakeup.notify_all()

    def _run(self) -> None:
        while True:
            if not self.scheduler.has_work():
                self._flush()  # nothing to overlap with: the last step's chunks go out now
            with self._wakeup:
                while not self._closed and not self.scheduler.has_work():
                    self._wakeup.wait()
                if self._closed:
                    self._flush()
                    return
            try:
                progressed = self.step()
            except Exception as exc:  # a fault outside the model (scheduling, bookkeeping): fail every request
                logger.exception("the step loop failed; failing every queued request")
                self._flush()
                self.waker.hold()
                for state in self.scheduler.drain():
                    self._deliver_error(state, exc)
                self.waker.release()
                progressed = True
            if not progressed:  # work that cannot be scheduled now (no room): wait a little
                with self._wakeup:
                    self._wakeup.wait(0.005)

    # -- one step -----------------------------------------------------------------------------------------
    def run_until_idle(self, max_steps: int = 100_000) -> int:
        """Runs steps on the calling thread until no work is left; returns how many ran. RuntimeError when
        work is left that cannot be scheduled (it would wait forever)."""
        steps = 0
        while self.scheduler.has_work():
            if not self.step():
                raise RuntimeError("requests are waiting but none can be scheduled")
            steps += 1
            if steps >= max_steps:
                raise RuntimeError(f"still busy after {max_steps} steps")
        self._flush()
        return steps

    def step(self) -> bool:
        """Runs one step; False when there was nothing to compute or end. The chunks it made are delivered
        before it returns, unless `defer_wakeups` (then once the next step is launched, or at idle)."""
        plan = self.scheduler.schedule()
        if not plan.chunks and not plan.ended:
            self._flush()
            return False
        start = time.perf_counter()
        tokens: list[int] = []
        try:
            if plan.chunks:
                logits = self.scheduler.backend.execute(plan.chunks)
                self._flush()  # the last step's chunks go out while the device computes this one
                states = [c.state for c in plan.chunks if c.samples]
                tokens = self.sampler.sample(logits, [s.params for s in states], [s.generator for s in states])
        except Exception as exc:
            logger.exception("a step of %d sequences failed", len(plan.chunks))
            self._flush()
            failed = [c.state for c in plan.chunks]
            self.scheduler.fail(failed)
            self.waker.hold()
            for state in failed:
                self._deliver_error(state, exc)
            for state in plan.ended:
                self._deliver(StepOutput(state, None, state.text.finish(), "cancelled"))
            self.waker.release()
            return True
        self._pending += self.scheduler.update(plan, tokens, time.perf_counter() - start)
        if not self.defer_wakeups:
            self._flush()
        return True

    def _flush(self) -> None:
        """Delivers the outputs held so far, their consumers woken at once (one wake-up per event loop)."""
        outputs, self._pending = self._pending, []
        self.waker.hold()
        for output in outputs:
            self._deliver(output)
        self.waker.release()

    def _deliver(self, output: StepOutput) -> None:
        state = output.state
        entry = self._sinks.get(id(state))
        if entry is None:
            return
        if not output.text and output.finish_reason is None:
            return  # nothing to show yet (an incomplete character, text a stop string may still cut)
        completion = state.completion_ids
        sent = self._emitted.get(id(state), 0)
        chunk = StreamChunk(
            text=output.text, token_ids=tuple(completion[sent:]), finish_reason=output.finish_reason,
            prompt_tokens=len(state.prompt), cached_tokens=state.cached_tokens or 0,
            completion_tokens=len(completion),
        )
        self._emitted[id(state)] = len(completion)
        if output.finish_reason is not None:
            self._ended(state)
        if not entry[1](chunk) and output.finish_reason is None:
            self.cancel(state)  # the consumer is gone

    def _deliver_error(self, state: SequenceState, exc: BaseException) -> None:
        entry = self._sinks.get(id(state))
        self._ended(state)
        if entry is not None:
            entry[1](exc)

    def _ended(self, state: SequenceState) -> None:
        self._sinks.pop(id(state), None)
        self._emitted.pop(id(state), None)
        if self.on_finished is not None:
            try:
                self.on_finished(state)
            except Exception:  # figures must never stop the serving loop
                logger.exception("on_finished failed")

