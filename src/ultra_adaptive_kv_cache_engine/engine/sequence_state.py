"""`SequenceState`: one request as the scheduler sees it, from submission to its finish.

Token accounting (every count in tokens): the sequence's tokens are the prompt followed by the generated
tokens; `num_computed` leading ones have KV in the backend (the reused prefix included). A step computes
``tokens[num_computed : num_computed + n]``; when that reaches the last token, its logits give the next
token. So a decode step is the case n == 1, a prefill is n > 1 or a chunk that stops short of the end, and a
sequence preempted by recompute simply restarts with ``num_computed = 0`` over prompt + generated tokens.

Ownership: the scheduler (on the step thread) mutates a state; submitters only set `cancel_requested`.
`kv` is the backend's handle on the sequence's KV (None while waiting).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compression.presses import PressConfig
from .incremental_text import IncrementalText
from .sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceState:
    """One request's progress (see the module docstring). `priority`: lower values are served first."""

    prompt: list[int]
    params: SamplingParams
    text: IncrementalText
    eos_token_id: int | None = None
    priority: int = 0
    generator: torch.Generator | None = None
    arrival: int = 0  # FCFS order among equal priorities (the scheduler numbers submissions)
    arrival_s: float = field(default_factory=time.perf_counter)
    status: SequenceStatus = SequenceStatus.WAITING
    generated: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int | None = None  # reused at the first admission (fixed from then on)
    kv: Any = None
    cancel_requested: bool = False
    finish_reason: str | None = None
    first_token_s: float | None = None
    finished_s: float | None = None
    prefill_s: float = 0.0  # this sequence's share of the steps that computed its prompt
    preemptions: int = 0
    conversation: str | None = None  # the conversation the request continues (controllers.conversation_key)
    hit_tiers: tuple[str, ...] = ()  # where each reused block was at the first admission ("pool", a tier)
    press: PressConfig | None = None  # token eviction at the end of the prompt's prefill (a paged backend's)

    @property
    def sort_key(self) -> tuple[int, int]:
        return (self.priority, self.arrival)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.generated)

    def tokens(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Tokens [start, stop) of prompt + generated."""
        stop = self.num_tokens if stop is None else stop
        p = len(self.prompt)
        if stop <= p:
            return self.prompt[start:stop]
        if start >= p:
            return self.generated[start - p : stop - p]
        return self.prompt[start:] + self.generated[: stop - p]

    @property
    def completion_ids(self) -> list[int]:
        """The generated tokens, without a final eos."""
        g = self.generated
        return g[:-1] if g and self.eos_token_id is not None and g[-1] == self.eos_token_id else g
