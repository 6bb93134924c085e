"""`ModelBackend`: what the scheduler asks of a model, whatever runs it.

A backend owns the KV of the sequences it serves (through the cache façade) and runs steps:
- `open(state)`: reuse the longest cached prefix of the state's tokens (at most all but the last) and take
  the KV room for the rest; sets ``state.num_computed`` (and `cached_tokens` at the first admission).
  Raises `OutOfBlocksError` with nothing held when the pool lacks room.
- `reserve(state, total)`: room for KV of `total` tokens; False (nothing taken) when the pool lacks it.
- `execute(chunks)`: computes every chunk (writing its KV); returns the logits (rows, vocab), float32, of the
  chunks that `sample`, in order.
- `close(state, keep)`: releases the state's KV; with `keep`, the KV of its generated tokens is written back
  and committed first, so a later turn reuses it.
`pause_at(state)` names a token count the state's chunks stop at (a press at the end of the prompt's prefill).
`blocks_to_open(state)` estimates the free blocks `open` needs (admission control); `blocks_for(n)` is what a
sequence of n tokens holds in the pool at most (a request that cannot fit alone is refused up front).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from ..cache.manager import KVCacheManager
from ..model.loaded import LoadedModel
from .scheduler_config import SchedulerConfig
from .sequence_state import SequenceState
from .step_plan import Chunk


class ModelBackend(ABC):
    """The model side of the step loop (see the module docstring). Called from one thread at a time."""

    name: ClassVar[str]
    #: False: a prompt is computed in one chunk (the scheduler does not split it under the step budget).
    chunked_prefill: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def unsupported(cls, loaded: LoadedModel, cache: KVCacheManager) -> str | None:
        """Why this backend cannot serve `loaded` over `cache`, or None when it can."""

    @classmethod
    @abstractmethod
    def create(cls, loaded: LoadedModel, cache: KVCacheManager, config: SchedulerConfig) -> ModelBackend: ...

    @property
    @abstractmethod
    def cache(self) -> KVCacheManager: ...

    @abstractmethod
    def blocks_for(self, num_tokens: int) -> int: ...

    @abstractmethod
    def blocks_to_open(self, state: SequenceState) -> int: ...

    @abstractmethod
    def open(self, state: SequenceState) -> None: ...

    @abstractmethod
    def reserve(self, state: SequenceState, total_tokens: int) -> bool: ...

    @abstractmethod
    def execute(self, chunks: Sequence[Chunk]) -> Tensor: ...

    @abstractmethod
    def close(self, state: SequenceState, keep: bool) -> None: ...

    def pause_at(self, state: SequenceState) -> int | None:
        """A token count at which the state's chunks must stop for one step (the backend then acts on its KV:
        a press), or None. The scheduler never plans a chunk across it."""
        return None
