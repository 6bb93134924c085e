"""The seed's `advanced_optimization(entries, goal)`: one function per goal, each MEASURING what it changed.

Every goal returns an `OptimizationReport` whose `improvement_percentage` is the measured reduction of the
goal's cost, (before - after) / before * 100, taken in the same call on the same entries:
- LATENCY: cost = time to retrieve every entry (a contiguous copy on the target device); entries that are
  not contiguous (or not page-locked when CUDA is present) are rewritten so. Nothing to rewrite: 0.0.
- MEMORY: cost = bytes; each float entry gets the smallest encoding from the codec registry whose measured
  error max|x_hat - x| / max|x| is within `max_relative_error` (lossless codecs always qualify).
- THROUGHPUT: cost = time to move every entry into one batch buffer; entries of one shape, dtype and device
  are stacked into one tensor, so the move is one copy per group instead of one per entry.
Timings are the median of `repeats` runs of the timer (injectable, `time.perf_counter` by default). Inputs
are never modified; the optimized entries are returned in `entries`.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compression import CODECS, EncodedTensor, make_codec
from ..types import CodecKind, OptimizationGoal

Timer = Callable[[], float]


@dataclass(frozen=True)
class OptimizationReport:
    """What one optimization did: entries changed, measured improvement (%), details, optimized entries."""

    optimized_count: int
    improvement_percentage: float
    metrics: dict[str, Any]
    entries: list[Any] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "optimized_count": self.optimized_count,
            "improvement_percentage": self.improvement_percentage,
            "metrics": self.metrics,
            "entries": self.entries,
        }


@dataclass(frozen=True)
class OptimizationOptions:
    """Knobs of the goals: error bound for MEMORY, timing repeats, the timer, the LATENCY target device."""

    max_relative_error: float = 0.01
    repeats: int = 5
    timer: Timer = time.perf_counter
    device: torch.device | None = None


def _improvement(before: float, after: float) -> float:
    return (before - after) / before * 100.0 if before > 0 else 0.0


def _median_time(fn: Callable[[], object], options: OptimizationOptions) -> float:
    samples = []
    for _ in range(options.repeats):
        start = options.timer()
        fn()
        samples.append(options.timer() - start)
    return statistics.median(samples)


def _target(options: OptimizationOptions) -> torch.device:
    if options.device is not None:
        return options.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def optimize_latency(entries: Sequence[torch.Tensor], options: OptimizationOptions) -> OptimizationReport:
    device = _target(options)
    pin = device.type == "cuda"

    def ready(t: torch.Tensor) -> bool:
        return t.is_contiguous() and (not pin or t.device.type != "cpu" or t.is_pinned())

    optimized = [t if ready(t) else (t.contiguous().pin_memory() if pin else t.contiguous()) for t in entries]
    changed = sum(a is not b for a, b in zip(entries, optimized, strict=True))
    metrics: dict[str, Any] = {"goal": "latency", "device": str(device), "entries": len(entries)}
    if not changed:
        metrics["note"] = "every entry was already contiguous" + (" and pinned" if pin else "")
        return OptimizationReport(0, 0.0, metrics, list(optimized))

    def retrieve(items: Sequence[torch.Tensor]) -> Callable[[], object]:
        return lambda: [t.to(device, copy=True, memory_format=torch.contiguous_format) for t in items]

    before = _median_time(retrieve(entries), options)
    after = _median_time(retrieve(optimized), options)
    metrics.update(retrieve_before_s=before, retrieve_after_s=after)
    return OptimizationReport(changed, _improvement(before, after), metrics, list(optimized))


def _smallest_encoding(tensor: torch.Tensor, bound: float) -> tuple[CodecKind, EncodedTensor, float]:
    """(codec, encoding, measured relative error) of the smallest encoding within `bound`."""
    best = (CodecKind.IDENTITY, make_codec(CodecKind.IDENTITY).encode(tensor), 0.0)
    scale = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    for kind in CODECS:
        try:
            codec = make_codec(kind)
            encoded = codec.encode(tensor)
        except (TypeError, ValueError):  # codec not for this dtype, or its package is missing
            continue
        if _encoded_bytes(encoded) >= _encoded_bytes(best[1]):
            continue
        decoded = codec.decode(encoded.payload, encoded.meta)
        error = float((decoded.float() - tensor.detach().cpu().float()).abs().max()) / scale if scale else 0.0
        if error <= bound:
            best = (kind, encoded, error)
    return best


def _encoded_bytes(encoded: EncodedTensor) -> int:
    """Payload plus the JSON meta a record would carry."""
    return encoded.nbytes + len(json.dumps(encoded.meta.as_json(), separators=(",", ":")))


def optimize_memory(entries: Sequence[torch.Tensor], options: OptimizationOptions) -> OptimizationReport:
    before = after = 0
    chosen: list[str] = []
    errors: list[float] = []
    encoded: list[EncodedTensor] = []
    for tensor in entries:
        kind, enc, error = _smallest_encoding(tensor, options.max_relative_error)
        before += tensor.numel() * tensor.element_size()
        after += _encoded_bytes(enc)
        chosen.append(kind.value)
        errors.append(error)
        encoded.append(enc)
    metrics = {
        "goal": "memory", "bytes_before": before, "bytes_after": after, "bytes_saved": before - after,
        "codecs": chosen, "max_relative_error": max(errors, default=0.0), "error_bound": options.max_relative_error,
    }  # fmt: skip
    changed = sum(c != CodecKind.IDENTITY.value for c in chosen)
    return OptimizationReport(changed, _improvement(before, after), metrics, encoded)


def optimize_throughput(entries: Sequence[torch.Tensor], options: OptimizationOptions) -> OptimizationReport:
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(entries):
        groups.setdefault((tuple(t.shape), t.dtype, t.device), []).append(i)
    start = options.timer()
    stacked = [torch.stack([entries[i] for i in idx]) for idx in groups.values()]
    stack_s = options.timer() - start
    buffers = [torch.empty_like(s) for s in stacked]

    def one_by_one() -> None:
        for buffer, idx in zip(buffers, groups.values(), strict=True):
            for slot, i in enumerate(idx):
                buffer[slot].copy_(entries[i])

    def batched() -> None:
        for buffer, block in zip(buffers, stacked, strict=True):
            buffer.copy_(block)

    before = _median_time(one_by_one, options)
    after = _median_time(batched, options)
    merged = sum(len(idx) for idx in groups.values() if len(idx) > 1)
    metrics = {"goal": "throughput", "groups": len(groups), "move_before_s": before, "move_after_s": after,
               "stack_s": stack_s, "entries": len(entries)}  # fmt: skip
    return OptimizationReport(merged, _improvement(before, after), metrics, stacked)


GOALS: dict[OptimizationGoal, Callable[[Sequence[torch.Tensor], OptimizationOptions], OptimizationReport]] = {
    OptimizationGoal.LATENCY: optimize_latency,
    OptimizationGoal.MEMORY: optimize_memory,
    OptimizationGoal.THROUGHPUT: optimize_throughput,
}


def parse_goal(goal: object) -> OptimizationGoal:
    """The goal named `goal`; ValueError naming the valid ones."""
    if isinstance(goal, OptimizationGoal):
        return goal
    if isinstance(goal, str) and goal.lower() in OptimizationGoal._value2member_map_:
        return OptimizationGoal(goal.lower())
    valid = ", ".join(g.value for g in GOALS)
    raise ValueError(f"optimization_goal={goal!r} is not valid; expected one of: {valid}")


def check_entries(entries: object) -> list[torch.Tensor]:
    """`entries` as a list of tensors; TypeError naming the first entry that is not one."""
    if isinstance(entries, torch.Tensor) or not isinstance(entries, Sequence):
        raise TypeError(f"cache_entries must be a list of tensors, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, torch.Tensor):
            raise TypeError(f"cache_entries[{i}] is a {type(entry).__name__}; expected a torch.Tensor")
    return list(entries)
