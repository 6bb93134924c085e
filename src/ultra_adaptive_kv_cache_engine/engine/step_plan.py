"""`Chunk` and `StepPlan`: what one step computes, the seam between the scheduler and the model backend."""

from __future__ import annotations

from dataclasses import dataclass

from .sequence_state import SequenceState


@dataclass(frozen=True, slots=True)
class Chunk:
    """Tokens ``[start, start + count)`` of one sequence, computed in this step (their KV written). When they
    reach the sequence's last token (`samples`), the step yields that token's logits."""

    state: SequenceState
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == self.state.num_tokens

    @property
    def is_decode(self) -> bool:
        """One token with the KV of all before it: the batched decode path."""
        return self.count == 1 and self.samples

    def token_ids(self) -> list[int]:
        return self.state.tokens(self.start, self.start + self.count)


@dataclass(frozen=True)
class StepPlan:
    """One step: the chunks to compute (running sequences first, in priority order, then admitted ones), the
    sequences preempted to make room (requeued), and those that ended before computing (cancelled)."""

    chunks: tuple[Chunk, ...]
    preempted: tuple[SequenceState, ...] = ()
    ended: tuple[SequenceState, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.count for c in self.chunks)
