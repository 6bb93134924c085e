"""Interleaved timing of contenders that do the same work: the benchmarks' one way to compare kernels.

Every round times one sample of each contender, in an order rotated from round to round, so clock, thermal
or neighbour drift lands on all of them alike; a figure is the median of its samples, a comparison the median
of the per-round ratios. A sample is `calls` back-to-back calls (the same count for every contender), long
enough (`target_s`) that the clock's resolution and one launch's latency vanish in it.

On CUDA each sample is timed with CUDA events. Contenders that allow it are captured once into a CUDA graph
of `calls` calls and replayed (the way the engine runs its decode steps), so the figures are GPU time with no
Python launch overhead; if any capture fails, all contenders run eagerly (and `Timings.note` says why). Each
sample starts behind a short GPU sleep, so the launches queue up before the first one runs. On the CPU each
sample is timed with perf_counter.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: GPU clock cycles slept before each sample (about 100 microseconds) while the CPU queues its launches.
HEAD_START_CYCLES = 200_000


@dataclass(frozen=True)
class Contender:
    """One function to time; `graph`: may be captured into a CUDA graph (no host synchronisation inside);
    `optional`: may be left out when its capture fails (the others then stay in their graphs)."""

    fn: Callable[[], object]
    graph: bool = True
    optional: bool = False


@dataclass(frozen=True)
class Timings:
    """Seconds per call, one sample per round for each contender (in round order)."""

    samples: dict[str, list[float]]
    calls: int  # calls per sample
    method: str  # "cuda_graph", "cuda_events" or "perf_counter"
    note: str | None = None

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def ratios(self, baseline: str, contender: str) -> list[float]:
        """Per round, the baseline's seconds over the contender's: the contender's speed as a fraction of the
        baseline's (1.0: as fast)."""
        return [a / b for a, b in zip(self.samples[baseline], self.samples[contender], strict=True)]


def rotating(fns: list[Callable[[], object]]) -> Callable[[], object]:
    """One call runs the next of `fns`, cycling (to read several copies of the data in turn)."""
    cycle = itertools.cycle(fns)
    return lambda: next(cycle)()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _eager(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def _capture(fn: Callable[[], object], calls: int, device: torch.device) -> Callable[[], None]:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # libraries set up their workspaces outside the capture
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        for _ in range(calls):
            fn()
    return graph.replay


def _runners(
    contenders: dict[str, Contender], calls: int, device: torch.device
) -> tuple[dict[str, Callable[[], None]], str, str | None]:
    """Graph replays on CUDA (eager for contenders that do not allow graphs); an optional contender whose
    capture fails is dropped, any other failure sends every contender back to eager launches."""
    eager = {name: _eager(c.fn, calls) for name, c in contenders.items()}
    if device.type != "cuda":
        return eager, "perf_counter", None
    runners, dropped = {}, []
    for name, c in contenders.items():
        try:
            runners[name] = _capture(c.fn, calls, device) if c.graph else eager[name]
        except Exception as exc:  # said in the note, never silent
            _sync(device)
            why = f"{name}: {type(exc).__name__}: {str(exc)[:150]}"
            if not c.optional:
                return eager, "cuda_events", f"graph capture failed, eager launches for all: {why}"
            dropped.append(why)
    return runners, "cuda_graph", ("dropped (capture failed): " + "; ".join(dropped)) if dropped else None


def _seconds_per_call(fn: Callable[[], object], device: torch.device, calls: int = 2) -> float:
    _sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / calls


def time_interleaved(
    contenders: dict[str, Contender], device: torch.device, rounds: int, warmup: int, target_s: float,
    max_calls: int = 256, multiple: int = 1,
) -> Timings:
    """Warm every contender up (`warmup` calls: compilation, allocator), size the samples from the fastest one
    (`target_s` seconds, at most `max_calls` calls, a multiple of `multiple`), then time `rounds` rounds. The
    samples hold only the contenders that were timed (see `_runners`)."""
    for c in contenders.values():
        for _ in range(warmup):
            c.fn()
    fastest = min(_seconds_per_call(c.fn, device) for c in contenders.values())
    calls = max(1, min(max_calls, math.ceil(target_s / max(fastest, 1e-7))))
    calls = multiple * math.ceil(calls / multiple)
    runners, method, note = _runners(contenders, calls, device)
    names = list(runners)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        if device.type == "cuda":
            events = []
            for name in order:
                if hasattr(torch.cuda, "_sleep"):
                    torch.cuda._sleep(HEAD_START_CYCLES)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runners[name]()
                end.record()
                events.append((name, start, end))
            _sync(device)
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) / 1e3 / calls)
        else:
            for name in order:
                t0 = time.perf_counter()
                runners[name]()
                samples[name].append((time.perf_counter() - t0) / calls)
    return Timings(samples, calls, method, note)
