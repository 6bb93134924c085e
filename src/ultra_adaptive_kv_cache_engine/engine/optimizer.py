"""`PerformanceOptimizer`: per request, load each cached block from its tier or recompute it, whichever is
cheaper by measurement; and the seed's `advanced_optimization(entries, goal)`.

Compute or load. A prompt of n tokens whose first blocks are cached (block i on tier `blocks[i].tier`) is
served by choosing a split k: load blocks [0, k), prefill tokens [k*B, n). A block is usable only if all its
parents are present, so only prefixes can be loaded, and at least one token is always computed (its logits
give the first new token), so k <= (n - 1) // B. The plan minimises
    load_time(k) + prefill_time(k*B, n),   load_time(k) = sum_{i<k} nbytes_i / bandwidth(tier_i)
over every k (ties go to the smaller k: less I/O), from the measured `BandwidthModel` and `PrefillCostModel`
(see cost_model.py). Since k = 0 (recompute) and k = max (load all) are candidates, the planned TTFT is never
above the cheaper of the two, up to the models' error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..policies.base import Clock
from .cost_model import BandwidthModel, PrefillCostModel
from .entry_optimization import GOALS, OptimizationOptions, check_entries, parse_goal


@dataclass(frozen=True)
class CachedBlock:
    """A cached block of the prompt's prefix: the tier it would be loaded from and its size in bytes."""

    tier: str
    nbytes: int


@dataclass(frozen=True)
class LoadPlan:
    """The split for one prompt: load `load_blocks` leading blocks, prefill the rest (estimates in seconds)."""

    load_blocks: int
    load_tokens: int
    compute_tokens: int
    load_s: float
    compute_s: float
    all_load_s: float
    recompute_s: float

    @property
    def total_s(self) -> float:
        return self.load_s + self.compute_s


class PerformanceOptimizer:
    """Decides compute-or-load from measured costs, and runs the seed's `advanced_optimization`."""

    def __init__(
        self,
        bandwidth: BandwidthModel | None = None,
        prefill: PrefillCostModel | None = None,
        clock: Clock | None = None,
        options: OptimizationOptions | None = None,
    ) -> None:
        self.bandwidth = bandwidth or BandwidthModel()
        self.prefill = prefill or PrefillCostModel()
        self.clock = clock or time.perf_counter
        self.options = options or OptimizationOptions()

    # -- measurements -----------------------------------------------------------------------------------------
    def observe_transfer(self, tier: str, nbytes: int, seconds: float) -> None:
        self.bandwidth.observe(tier, nbytes, seconds)

    def observe_prefill(self, start: int, end: int, seconds: float) -> None:
        self.prefill.observe(start, end, seconds)

    def probe_tier(self, tier: str, read: Callable[[], int]) -> float:
        """Time `read()` (which transfers from `tier` and returns the bytes it moved); set it as the prior."""
        start = self.clock()
        nbytes = read()
        seconds = self.clock() - start
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1 or not seconds > 0:
            raise ValueError(f"probe of tier {tier!r} moved {nbytes!r} bytes in {seconds!r} s; expected both > 0")
        self.bandwidth.set_prior(tier, nbytes / seconds)
        return nbytes / seconds

    # -- compute or load ------------------------------------------------------------------------------------
    def plan(self, prompt_tokens: int, block_size: int, blocks: Sequence[CachedBlock]) -> LoadPlan:
        """The cheapest split for a prompt of `prompt_tokens` whose cached prefix is `blocks` (prefix order)."""
        for name, value, low in (("prompt_tokens", prompt_tokens, 1), ("block_size", block_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        usable = min(len(blocks), (prompt_tokens - 1) // block_size)
        load = [0.0]
        for block in blocks[:usable]:
            if not isinstance(block, CachedBlock):
                raise TypeError(f"blocks must hold CachedBlock, got {type(block).__name__}")
            load.append(load[-1] + self.bandwidth.transfer_time(block.tier, block.nbytes))
        costs = [load[k] + self.prefill.time(k * block_size, prompt_tokens) for k in range(usable + 1)]
        best = min(range(usable + 1), key=lambda k: (costs[k], k))
        return LoadPlan(
            load_blocks=best,
            load_tokens=best * block_size,
            compute_tokens=prompt_tokens - best * block_size,
            load_s=load[best],
            compute_s=costs[best] - load[best],
            all_load_s=costs[usable],
            recompute_s=costs[0],
        )

    # -- the seed's entry optimization --------------------------------------------------------------------------
    def advanced_optimization(
        self, cache_entries: list[torch.Tensor], optimization_goal: str = "latency"
    ) -> dict[str, Any]:
        """Optimize `cache_entries` for "latency", "memory" or "throughput" and measure the improvement.

        Returns {"optimized_count", "improvement_percentage", "metrics", "entries"}; ValueError for an unknown
        goal (naming the valid ones), TypeError for entries that are not tensors. Inputs are not modified.
        """
        goal = parse_goal(optimization_goal)
        entries = check_entries(cache_entries)
        return GOALS[goal](entries, self.options).as_dict()
