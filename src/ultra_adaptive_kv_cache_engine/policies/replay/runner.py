"""`run_replay`: a trace at several capacities through several policies and Belady's bound."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..base import EvictionPolicy
from ..registry import POLICIES, make_policy
from .belady import BeladyPolicy, next_uses
from .simulator import CompiledTrace, ReplayCounts, RequestClock, compile_trace, simulate
from .trace import TraceRequest, load_trace, parse_request

BELADY = "belady"
DEFAULT_BYTES_PER_TOKEN = 128 * 1024  # Llama-3-8B KV in bf16
TraceSource = str | os.PathLike[str] | Sequence[TraceRequest | Mapping[str, Any]]


@dataclass(frozen=True)
class ReplayResult:
    """One policy at one capacity on one trace. Rates are in [0, 1]; bytes = tokens * bytes_per_token.

    `bytes_loaded`: KV read from the cache for hit tokens; `bytes_stored`: KV written for stored tokens.
    """

    trace: str
    policy: str
    capacity_tokens: int
    requests: int
    blocks: int
    tokens: int
    hit_blocks: int
    hit_tokens: int
    stored_blocks: int
    evicted_blocks: int
    block_hit_rate: float
    token_hit_rate: float
    bytes_loaded: int
    bytes_stored: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _result(trace: CompiledTrace, policy: str, capacity: int, c: ReplayCounts, bpt: int) -> ReplayResult:
    blocks, tokens = trace.blocks, trace.total_tokens
    return ReplayResult(
        trace=trace.name, policy=policy, capacity_tokens=capacity, requests=trace.requests, blocks=blocks,
        tokens=tokens, hit_blocks=c.hit_blocks, hit_tokens=c.hit_tokens, stored_blocks=c.stored_blocks,
        evicted_blocks=c.evicted_blocks, block_hit_rate=c.hit_blocks / blocks if blocks else 0.0,
        token_hit_rate=c.hit_tokens / tokens if tokens else 0.0, bytes_loaded=c.hit_tokens * bpt,
        bytes_stored=c.stored_tokens * bpt,
    )


def _new_policy(name: str, capacity: int, clock: RequestClock) -> EvictionPolicy:
    return BeladyPolicy(capacity, clock) if name == BELADY else make_policy(name, capacity, clock)


def _replay_job(
    trace: CompiledTrace,
    policy: str,
    capacity: int,
    future: Sequence[Sequence[float]] | None,
    progress: Callable[[int], object] | None = None,
) -> ReplayCounts:
    clock = RequestClock()
    return simulate(trace, _new_policy(policy, capacity, clock), capacity, clock, future, progress)


def _as_trace(source: TraceSource, block_tokens: int) -> CompiledTrace:
    if isinstance(source, str | os.PathLike):
        return compile_trace(load_trace(source), block_tokens, Path(source).stem)
    if isinstance(source, (bytes, bytearray)) or not isinstance(source, Sequence):
        raise TypeError(f"trace must be a path or a sequence of requests, got {type(source).__name__}")
    requests = [r if isinstance(r, TraceRequest) else parse_request(r, f"request {i}") for i, r in enumerate(source)]
    return compile_trace(requests, block_tokens, "requests")


def _check(capacities: Iterable[int], policies: Iterable[str]) -> tuple[list[int], list[str]]:
    caps = list(capacities)
    for c in caps:
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"capacity {c!r} must be a positive number of tokens")
    names = [str(p).lower() for p in policies]
    unknown = [p for p in names if p != BELADY and p not in POLICIES]
    if unknown or not names or not caps:
        valid = ", ".join(sorted([*POLICIES, BELADY]))
        raise ValueError(f"policies={names!r} / capacities={caps!r}: need at least one of each; policies from: {valid}")
    return caps, names


def run_replay(
    trace: TraceSource,
    capacities: Iterable[int],
    policies: Iterable[str] = (*POLICIES, BELADY),
    *,
    block_tokens: int = 512,
    bytes_per_token: int = DEFAULT_BYTES_PER_TOKEN,
    workers: int = 1,
    name: str | None = None,
    show_progress: bool = True,
) -> list[ReplayResult]:
    """Replay `trace` (a JSONL path, or TraceRequests / dicts in the Mooncake schema) for every pair of
    `capacities` (tokens) and `policies` (registry names, or "belady" for the offline bound).

    Results come back ordered by policy (as given) then capacity (as given). `workers` > 1 replays pairs in
    that many processes. A tqdm bar on stderr counts replayed requests. Raises ValueError on bad arguments.
    """
    caps, names = _check(capacities, policies)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer")
    compiled = _as_trace(trace, block_tokens)
    if name is not None:
        compiled = CompiledTrace(name, compiled.keys, compiled.tokens, compiled.block_tokens)
    future = next_uses(compiled.keys) if BELADY in names else None
    jobs = [(p, c) for p in names for c in caps]
    bar = tqdm(total=len(jobs) * compiled.requests, unit="req", file=sys.stderr, disable=not show_progress,
               desc=f"replay {compiled.name}")
    counts: dict[tuple[str, int], ReplayCounts] = {}
    started = time.perf_counter()
    if workers == 1:
        for p, c in jobs:
            counts[(p, c)] = _replay_job(compiled, p, c, future if p == BELADY else None, bar.update)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("fork")) as pool:
            pending = {(p, c): pool.submit(_replay_job, compiled, p, c, future if p == BELADY else None) for p, c in jobs}
            for key, fut in pending.items():
                counts[key] = fut.result()
                bar.update(compiled.requests)
    bar.close()
    tqdm.write(f"replayed {len(jobs)} runs in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return [_result(compiled, p, c, counts[(p, c)], bytes_per_token) for p, c in jobs]
