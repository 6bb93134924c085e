"""StreamingLLM (Xiao et al., 2023): keep the first `sinks` tokens (the attention sinks) and the most recent
ones up to the budget. Data-free: every layer and head keeps the same tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import LayerObservation, Press, check_kept


@dataclass(frozen=True)
class SinksWindowPress(Press):
    """Positions ``0 .. s - 1`` and ``length - (kept - s) .. length - 1`` with ``s = min(sinks, kept)``."""

    name: ClassVar[str] = "sinks_window"
    sinks: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks_window: sinks={self.sinks!r} must be a non-negative integer")

    def select(self, obs: LayerObservation, kept: int) -> Tensor:
        check_kept(obs, kept)
        sinks = min(self.sinks, kept)
        recent = torch.arange(obs.length - (kept - sinks), obs.length)
        positions = torch.cat([torch.arange(sinks), recent])
        return positions.expand(obs.num_kv_heads, kept).clone()
