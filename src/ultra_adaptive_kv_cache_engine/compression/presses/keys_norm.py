"""Keys norm (Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression"): tokens whose keys have a LOW L2 norm draw the most attention; each KV head keeps its
lowest-norm keys, and the last `window` prompt tokens always. Reads only the keys (no queries)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .base import LayerObservation, Press, check_kept, keep_top


@dataclass(frozen=True)
class KeysNormPress(Press):
    """Score of token t for head h: ``-||keys[t, h]||_2``."""

    name: ClassVar[str] = "keys_norm"
    needs_keys: ClassVar[bool] = True
    window: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"keys_norm: window={self.window!r} must be a non-negative integer")

    def select(self, obs: LayerObservation, kept: int) -> Tensor:
        check_kept(obs, kept)
        if obs.keys is None or tuple(obs.keys.shape[:2]) != (obs.length, obs.num_kv_heads):
            got = None if obs.keys is None else tuple(obs.keys.shape)
            raise ValueError(f"keys_norm needs keys ({obs.length}, {obs.num_kv_heads}, head_dim), got {got}")
        scores = -obs.keys.float().norm(dim=-1).t().cpu()  # (heads, length)
        forced = torch.arange(obs.length) >= obs.length - min(self.window, obs.length)
        return keep_top(scores, kept, forced)
