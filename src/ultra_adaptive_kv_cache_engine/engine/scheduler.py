"""`Scheduler`: iteration-level (continuous) batching: which sequences compute which tokens in each step.

Every step (`schedule`):
1. Cancelled sequences end (their KV is released at once).
2. A waiting request of strictly higher priority than the lowest running one preempts it when the batch is
   full or the pool lacks room for it.
3. Running sequences, in priority order (lower `priority` first, then arrival: FCFS), get their next chunk:
   one token when decoding, the next piece of their prompt when prefilling, as far as the step's token
   budget goes. A sequence whose next token needs a block the pool lacks preempts the lowest-priority running
   sequence (itself, if it is the lowest): recompute, i.e. its KV is released and it goes back to the
   front of the waiting queue with its generated tokens, to be prefilled again (its prompt's committed blocks
   are usually still cached). Swapping to the CPU tier is not done: the committed prefix already survives in
   the tiers, and recomputing the rest is simple and exact.
4. Waiting requests are admitted in priority order while the budget, `max_running` and the pool allow
   (admission leaves `admission_headroom` of the blocks free); admission reuses the cached prefix through
   the backend, so cached tokens are not recomputed.
After the backend computed the step and the sampler picked tokens, `update` appends them, detects eos, stop
strings and max_new_tokens, releases finished sequences (writing their generated KV back for reuse) and
returns what each sequence produced.

Thread safety: `add` and `cancel` may be called from any thread; `schedule` and `update` from the step thread
only. The lock is never held while the model computes.
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..memory import OutOfBlocksError
from .backend import ModelBackend
from .requests import RequestError
from .scheduler_config import SchedulerConfig
from .sequence_state import SequenceState, SequenceStatus
from .step_plan import Chunk, StepPlan


class QueueFullError(RuntimeError):
    """The waiting queue is full (HTTP 429): retry later."""


@dataclass(frozen=True)
class StepOutput:
    """What one sequence produced in a step: its new token (None when none was sampled for it), the text
    released, and its finish reason once it ended."""

    state: SequenceState
    token: int | None
    text: str
    finish_reason: str | None


class Scheduler:
    """Waiting queue, running batch, admission, token budget, preemption (see the module docstring)."""

    def __init__(self, backend: ModelBackend, config: SchedulerConfig | None = None) -> None:
        self.backend = backend
        self.config = config if config is not None else SchedulerConfig()
        self.waiting: list[SequenceState] = []  # sorted by sort_key
        self.running: list[SequenceState] = []  # sorted by sort_key
        self._lock = threading.Lock()
        self._arrivals = itertools.count()
        self._cancelled: deque[SequenceState] = deque()
        self.num_preemptions = 0
        cache = backend.cache
        self._headroom = int(cache.num_blocks * self.config.admission_headroom)

    # -- from any thread ----------------------------------------------------------------------------------
    def add(self, state: SequenceState) -> None:
        """Queues a new request; QueueFullError when `max_waiting` requests already wait, RequestError when
        its prompt and max_new_tokens could not fit in the pool even alone."""
        need = self.backend.blocks_for(len(state.prompt) + state.params.max_new_tokens)
        room = self.backend.cache.num_blocks - self._headroom
        if need > room:
            raise RequestError(
                f"prompt of {len(state.prompt)} tokens + max_new_tokens={state.params.max_new_tokens} needs {need} "
                f"KV blocks; the pool has {room} for one request; shorten the prompt or lower max_new_tokens"
            )
        with self._lock:
            if len(self.waiting) >= self.config.max_waiting:
                raise QueueFullError(
                    f"{len(self.waiting)} requests are waiting (SchedulerConfig.max_waiting="
                    f"{self.config.max_waiting}); retry later"
                )
            state.arrival = next(self._arrivals)
            state.status = SequenceStatus.WAITING
            bisect.insort(self.waiting, state, key=_key)

    def cancel(self, state: SequenceState) -> None:
        """Asks for `state` to end with "cancelled" at the next step boundary (no-op once finished). Takes no
        lock (a deque append), so a finalizer may call it from any thread at any point, the step thread
        inside `schedule` included."""
        if state.status is not SequenceStatus.FINISHED and not state.cancel_requested:
            state.cancel_requested = True
            self._cancelled.append(state)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running or self._cancelled)

    # -- the step thread ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next step's plan (see the module docstring)."""
        with self._lock:
            ended = self._end_cancelled()
            preempted: list[SequenceState] = []
            self._preempt_for_priority(preempted)
            for_priority = len(preempted)
            budget = self.config.max_step_tokens
            chunks: list[Chunk] = []
            for state in list(self.running):
                if budget == 0:
                    break
                if state.status is not SequenceStatus.RUNNING:
                    continue  # preempted earlier in this loop
                count = self._chunk_size(state, budget, bool(chunks))
                if count and self._reserve(state, state.num_computed + count, preempted):
                    chunks.append(Chunk(state, state.num_computed, count))
                    budget -= count
            while budget > 0 and self.waiting and len(preempted) == for_priority:  # no admission when short of room
                state = self.waiting[0]
                count = self._chunk_size(state, budget, bool(chunks))
                if not count or not self._admit(state):
                    break
                count = self._chunk_size(state, budget, bool(chunks))  # the cached prefix is known now
                chunks.append(Chunk(state, state.num_computed, count))
                budget -= count
            return StepPlan(tuple(chunks), tuple(preempted), tuple(ended))

    def update(self, plan: StepPlan, tokens: Sequence[int], elapsed_s: float = 0.0) -> list[StepOutput]:
        """Applies a computed step: `tokens` are the sampled tokens of the chunks that sample, in order;
        `elapsed_s` the step's duration (its prefill share is added to each prefilling sequence)."""
        outputs = [StepOutput(s, None, s.text.finish(), "cancelled") for s in plan.ended]
        sampled = iter(tokens)
        now = time.perf_counter()
        total = max(plan.num_tokens, 1)
        with self._lock:
            for chunk in plan.chunks:
                state = chunk.state
                state.num_computed += chunk.count
                if not chunk.is_decode:
                    state.prefill_s += elapsed_s * chunk.count / total
                if chunk.samples:
                    outputs.append(self._accept(state, next(sampled), now))
        return outputs

    def fail(self, states: Sequence[SequenceState]) -> None:
        """Ends `states` after the backend failed computing them (their KV released, not kept)."""
        with self._lock:
            for state in states:
                if state.status is SequenceStatus.RUNNING:
                    self._end(state, "cancelled", keep=False)

    def drain(self) -> list[SequenceState]:
        """Ends every waiting and running sequence (KV released, best effort); returns them."""
        with self._lock:
            states = self.waiting + self.running
            for state in list(self.running):
                try:
                    self._end(state, "cancelled", keep=False)
                except Exception:  # keep draining: the others must be released too
                    pass
            for state in self.waiting:
                state.status, state.finish_reason = SequenceStatus.FINISHED, "cancelled"
            self.waiting = []
            self._cancelled.clear()
            return states

    # -- helpers (lock held) ------------------------------------------------------------------------------
    def _chunk_size(self, state: SequenceState, budget: int, others: bool) -> int:
        """Tokens of `state` to compute now: up to the budget and never past the backend's `pause_at`; for a
        backend without chunked prefill, all or nothing (all even past the budget when nothing else is
        scheduled, so a long prompt cannot starve)."""
        remaining = state.num_tokens - state.num_computed
        pause = self.backend.pause_at(state)
        if pause is not None and pause > state.num_computed:  # the backend acts on the KV there (a press)
            remaining = pause - state.num_computed
        if self.backend.chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget or not others else 0

    def _end_cancelled(self) -> list[SequenceState]:
        ended = []
        while self._cancelled:
            state = self._cancelled.popleft()
            if state.status is SequenceStatus.FINISHED:
                continue
            if state.status is SequenceStatus.WAITING:
                self.waiting.remove(state)
                state.status, state.finish_reason = SequenceStatus.FINISHED, "cancelled"
                state.finished_s = time.perf_counter()
            else:
                self._end(state, "cancelled", keep=False)
            ended.append(state)
        return ended

    def _preempt_for_priority(self, preempted: list[SequenceState]) -> None:
        while self.waiting and self.running:
            head, lowest = self.waiting[0], self.running[-1]
            if head.priority >= lowest.priority or self._fits(head):
                return
            self._preempt(lowest, preempted)

    def _fits(self, state: SequenceState) -> bool:
        if len(self.running) >= self.config.max_running:
            return False
        need = self.backend.blocks_to_open(state)
        return need + self._headroom <= self.backend.cache.num_free_blocks

    def _admit(self, state: SequenceState) -> bool:
        if not self._fits(state):
            return False
        try:
            self.backend.open(state)
        except OutOfBlocksError:
            return False
        self.waiting.pop(0)
        state.status = SequenceStatus.RUNNING
        bisect.insort(self.running, state, key=_key)
        return True

    def _reserve(self, state: SequenceState, total_tokens: int, preempted: list[SequenceState]) -> bool:
        """Room for `state`'s KV up to `total_tokens`, preempting lowest-priority sequences as needed; False
        when `state` itself was preempted."""
        while not self.backend.reserve(state, total_tokens):
            victim = self.running[-1]
            self._preempt(victim, preempted)
            if victim is state:
                return False
        return True

    def _preempt(self, state: SequenceState, preempted: list[SequenceState]) -> None:
        self.running.remove(state)
        self.backend.close(state, keep=False)
        state.num_computed, state.status = 0, SequenceStatus.WAITING
        state.preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, state, key=_key)
        preempted.append(state)

    def _accept(self, state: SequenceState, token: int, now: float) -> StepOutput:
        state.generated.append(token)
        if state.first_token_s is None:
            state.first_token_s = now
        reason = None
        if token == state.eos_token_id:
            text, reason = "", "stop"
        else:
            text = state.text.add([token])
            if state.text.stopped:
                reason = "stop"
            elif len(state.generated) >= state.params.max_new_tokens:
                reason = "length"
        if reason is not None:
            text += state.text.finish()
            self._end(state, reason, keep=True)
        return StepOutput(state, token, text, reason)

    def _end(self, state: SequenceState, reason: str, keep: bool) -> None:
        self.running.remove(state)
        try:
            self.backend.close(state, keep)
        finally:
            state.status, state.finish_reason = SequenceStatus.FINISHED, reason
            state.finished_s = time.perf_counter()


def _key(state: SequenceState) -> tuple[int, int]:
    return state.sort_key
