"""`run_fleet`: one trace through fleets of several sizes, for several routing policies, with and without the
global tier, next to the bound of one cache of the same summed capacity."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

from ..replay.simulator import CompiledTrace, compile_trace
from ..replay.trace import TraceRequest, load_trace
from .routing import ROUTING_POLICIES
from .simulator import ONE_CACHE, FleetResult, FleetSpec, simulate_fleet


@dataclass(frozen=True)
class FleetSweep:
    """Which fleets `run_fleet` simulates: every size of `instances` x every `routings` name x global tier off
    and on (`global_tokens_per_instance` tokens per instance; 0: only off), plus the ONE_CACHE bound per size.
    `template` carries the rest (local capacity, eviction policy, prefill rate, routing options)."""

    instances: tuple[int, ...]
    routings: tuple[str, ...]
    template: FleetSpec
    global_tokens_per_instance: int = 0
    workers: int = 1

    def specs(self) -> list[FleetSpec]:
        unknown = [r for r in self.routings if r not in ROUTING_POLICIES]
        if unknown or not self.routings or not self.instances:
            raise ValueError(f"routings={list(self.routings)!r} / instances={list(self.instances)!r}: need at least "
                             f"one of each; routings from: {', '.join(sorted(ROUTING_POLICIES))}")
        globals_ = (0, self.global_tokens_per_instance) if self.global_tokens_per_instance else (0,)
        out = [replace(self.template, instances=n, routing=r, global_tokens=g * n,
                       routing_options=self.template.routing_options if ROUTING_POLICIES[r].uses_cache else {})
               for n in self.instances for r in self.routings for g in globals_]
        out += [replace(self.template, instances=n, routing=ONE_CACHE, global_tokens=0) for n in self.instances]
        return out


def load_compiled(source: str | os.PathLike[str] | Sequence[TraceRequest], block_tokens: int = 512,
                  name: str | None = None) -> tuple[CompiledTrace, list[float]]:
    """A trace (JSONL path or requests) compiled for replay, and its arrival times in seconds."""
    requests = load_trace(source) if isinstance(source, str | os.PathLike) else list(source)
    label = name or (Path(source).stem if isinstance(source, str | os.PathLike) else "requests")
    return compile_trace(requests, block_tokens, label), [r.timestamp / 1e3 for r in requests]


def _job(args: tuple[CompiledTrace, list[float], FleetSpec]) -> FleetResult:
    return simulate_fleet(*args)


def run_fleet(trace: CompiledTrace, arrivals_s: list[float], sweep: FleetSweep) -> list[FleetResult]:
    """Every fleet of `sweep` on `trace`, in `sweep.specs()` order; `sweep.workers` > 1 uses that many processes."""
    if isinstance(sweep.workers, bool) or not isinstance(sweep.workers, int) or sweep.workers < 1:
        raise ValueError(f"workers={sweep.workers!r} must be a positive integer")
    jobs = [(trace, arrivals_s, spec) for spec in sweep.specs()]
    if sweep.workers == 1:
        results = [_job(j) for j in jobs]
    else:
        with ProcessPoolExecutor(sweep.workers, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_job, jobs))
    print(f"fleet-sim: {len(jobs)} fleets on {trace.name} ({trace.requests} requests)", file=sys.stderr)
    return results


def parse_sizes(text: str | Iterable[int]) -> tuple[int, ...]:
    """'1-128' -> (1, 2, 4, ..., 128) (powers of two); '1,3,16' -> (1, 3, 16)."""
    if not isinstance(text, str):
        return tuple(int(n) for n in text)
    if "-" in text:
        low, high = (int(p) for p in text.split("-", 1))
        if low < 1 or high < low:
            raise ValueError(f"instances {text!r}: expected LOW-HIGH with 1 <= LOW <= HIGH, such as 1-128")
        sizes, n = [], low
        while n <= high:
            sizes.append(n)
            n *= 2
        return tuple(sizes)
    try:
        return tuple(int(p) for p in text.split(",") if p)
    except ValueError:
        raise ValueError(f"instances {text!r}: expected sizes such as 1-128 (powers of two) or 1,4,16") from None


def parse_tokens(text: str) -> int:
    """'3M' -> 3_000_000, '500k' -> 500_000, '2048' -> 2048, '0' -> 0 (tokens)."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale != 1 else text) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a number of tokens such as 3M, 500k or 2048") from None
    if value < 0:
        raise ValueError(f"{text!r} must be a number of tokens >= 0")
    return int(value)
