"""What every token-eviction press shares: the budget (`PressConfig`), what it sees of one layer
(`LayerObservation`) and the interface (`Press.select`).

A press runs once, at the end of a sequence's prefill, and keeps `kept` of the prompt's `length` tokens per
layer and per KV head. Every head keeps the same NUMBER of tokens (possibly different ones), so the pressed KV
is again a paged sequence of `kept` tokens: slot j of head h holds head h's j-th kept token. Indices are
returned ascending (the original order), as int64 of shape (num_kv_heads, kept).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

ParamValue = int | float | str


@dataclass(frozen=True)
class PressConfig:
    """A press by name with its budget: exactly one of `ratio` (a share of the prompt, in (0, 1]) or `tokens`
    (a count, >= 1), and the press's own parameters (`params`, a mapping normalised to sorted pairs)."""

    name: str
    ratio: float | None = None
    tokens: int | None = None
    params: tuple[tuple[str, ParamValue], ...] | Mapping[str, ParamValue] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"PressConfig.name={self.name!r} must be a non-empty press name")
        if (self.ratio is None) == (self.tokens is None):
            raise ValueError(f"PressConfig needs exactly one of ratio or tokens, got ratio={self.ratio!r}, "
                             f"tokens={self.tokens!r}")
        if self.ratio is not None and (isinstance(self.ratio, bool) or not isinstance(self.ratio, int | float)
                                       or not 0 < self.ratio <= 1):
            raise ValueError(f"PressConfig.ratio={self.ratio!r} must be a number in (0, 1]")
        if self.tokens is not None and (isinstance(self.tokens, bool) or not isinstance(self.tokens, int)
                                        or self.tokens < 1):
            raise ValueError(f"PressConfig.tokens={self.tokens!r} must be a positive integer")
        pairs = tuple(sorted(dict(self.params).items()))
        for key, value in pairs:
            if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, int | float | str):
                raise ValueError(f"PressConfig.params[{key!r}]={value!r}: expected str keys and int/float/str values")
        object.__setattr__(self, "params", pairs)  # normalising the given mapping, not deriving a new value

    def budget(self, length: int) -> int:
        """Tokens kept of a `length`-token prompt: min(tokens, length), or ceil(ratio * length) (at least 1)."""
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length={length!r} must be a positive integer")
        if self.tokens is not None:
            return min(self.tokens, length)
        assert self.ratio is not None
        return max(1, min(length, math.ceil(self.ratio * length - 1e-9)))

    def describe(self) -> str:
        """A canonical text of the press and its parameters (the budget is not part of it)."""
        params = ",".join(f"{k}={v!r}" for k, v in self.params)  # type: ignore[misc]
        return f"{self.name}({params})"


@dataclass(frozen=True)
class LayerObservation:
    """What a press may read of one layer of the prompt.

    `keys` (length, kv_heads, head_dim) float32 carry RoPE; `attention` (q_heads, window, length) float32 holds
    the softmax attention of the last `window` prompt tokens' queries over every prompt token (causal: row i,
    the query at position length - window + i, is zero after that position). Either is None when the press
    did not ask for it (`Press.needs_keys`, `Press.observation_window`).
    """

    layer: int
    length: int
    num_kv_heads: int
    keys: Tensor | None = None
    attention: Tensor | None = None


class Press(ABC):
    """Chooses which prompt tokens each KV head keeps. Subclasses are frozen dataclasses of their parameters."""

    name: ClassVar[str]
    needs_keys: ClassVar[bool] = False

    def observation_window(self, length: int) -> int:
        """How many of the last prompt tokens' queries the press reads (0: none)."""
        return 0

    @abstractmethod
    def select(self, obs: LayerObservation, kept: int) -> Tensor:
        """Kept token indices (num_kv_heads, kept) int64, ascending, distinct, in [0, obs.length)."""


def check_kept(obs: LayerObservation, kept: int) -> None:
    """ValueError unless 1 <= kept <= obs.length."""
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= obs.length:
        raise ValueError(f"kept={kept!r} must be an int in [1, {obs.length}] (the prompt length)")


def keep_top(scores: Tensor, kept: int, forced: Tensor) -> Tensor:
    """Per row of `scores` (heads, length): every `forced` position ((length,) bool), then the highest-scoring
    others (ties: the earlier position), `kept` in all; when more are forced than kept, the LAST `kept` forced
    positions. Returns ascending indices (heads, kept) int64."""
    heads = int(scores.shape[0])
    forced_ids = forced.nonzero()[:, 0]
    if forced_ids.numel() >= kept:
        return forced_ids[forced_ids.numel() - kept :].expand(heads, kept).clone()
    free = (~forced).nonzero()[:, 0]
    order = torch.sort(scores[:, free].double(), dim=1, descending=True, stable=True).indices
    chosen = free[order[:, : kept - forced_ids.numel()]]
    both = torch.cat([forced_ids.expand(heads, -1), chosen], dim=1)
    return torch.sort(both, dim=1).values
