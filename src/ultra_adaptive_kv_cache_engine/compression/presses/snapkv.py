"""SnapKV (Li et al., 2024): the last `window` prompt tokens (the observation window) vote for the tokens
before them by their attention, summed over the window, smoothed by a 1-D pooling over neighbouring tokens
(`kernel`, "avg" or "max"), averaged over the query heads of each KV head (GQA); each KV head keeps its top
tokens and always the observation window itself. Defaults are those of the paper's LongBench runs: a window of
32 queries, max pooling over 7 tokens. Hybrid (the default): every head also keeps the first `sinks` tokens
(StreamingLLM's attention sinks) and the most recent `recent` share of the kept tokens (at least the
observation window); the scores choose the rest among the middle tokens. ``sinks=0,recent=0`` is the paper's
press. Defaults measured on bench_kv_quality's Bible windows (continuation perplexity at 1/2 and 1/4 of the
prompt): the paper's press lost to sinks + window at both budgets; see the README's "Presses on the live path"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LayerObservation, Press, check_kept, keep_top

_POOLS = {"avg": F.avg_pool1d, "max": F.max_pool1d}


@dataclass(frozen=True)
class SnapKVPress(Press):
    """Scores of token t < length - w: the pooled sum over the window's queries of their attention to t. Kept
    regardless: positions ``< min(sinks, kept - r)`` and ``>= length - r`` with ``r = max(window, round(recent *
    kept))`` (when these exceed `kept`, the most recent of them)."""

    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    sinks: int = 4
    recent: float = 0.9

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"snapkv: window={self.window!r} must be a positive integer")
        if isinstance(self.kernel, bool) or not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: kernel={self.kernel!r} must be a positive odd integer")
        if self.pooling not in _POOLS:
            raise ValueError(f"snapkv: pooling={self.pooling!r}; expected one of: {', '.join(sorted(_POOLS))}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"snapkv: sinks={self.sinks!r} must be a non-negative integer")
        if isinstance(self.recent, bool) or not isinstance(self.recent, int | float) or not 0 <= self.recent <= 1:
            raise ValueError(f"snapkv: recent={self.recent!r} must be a share of the kept tokens in [0, 1]")

    def observation_window(self, length: int) -> int:
        return min(self.window, length)

    def scores(self, obs: LayerObservation) -> Tensor:
        """(num_kv_heads, length) float32; the window's own positions score 0 (they are kept regardless)."""
        attention = obs.attention
        window = self.observation_window(obs.length)
        if attention is None or tuple(attention.shape[1:]) != (window, obs.length):
            got = None if attention is None else tuple(attention.shape)
            raise ValueError(f"snapkv needs the attention (q_heads, {window}, {obs.length}) of the observation "
                             f"window, got {got}")
        q_heads = int(attention.shape[0])
        if q_heads % obs.num_kv_heads:
            raise ValueError(f"{q_heads} query heads are not a multiple of {obs.num_kv_heads} KV heads")
        votes = attention[:, :, : obs.length - window].float().sum(dim=1)  # (q_heads, prefix)
        votes = votes.view(obs.num_kv_heads, q_heads // obs.num_kv_heads, -1).mean(dim=1)
        if votes.shape[1] > 0:
            votes = _POOLS[self.pooling](votes[:, None], self.kernel, stride=1, padding=self.kernel // 2)[:, 0]
        return F.pad(votes, (0, window))

    def select(self, obs: LayerObservation, kept: int) -> Tensor:
        check_kept(obs, kept)
        positions = torch.arange(obs.length)
        recent = max(self.observation_window(obs.length), round(self.recent * kept))
        forced = (positions >= obs.length - recent) | (positions < min(self.sinks, kept - min(recent, kept)))
        return keep_top(self.scores(obs).cpu(), kept, forced)
