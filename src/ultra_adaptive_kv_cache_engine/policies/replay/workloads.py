"""Synthetic request traces in the Mooncake schema: chat, shared system prompt, RAG, agents, scans, a mix.

Every workload is a Poisson stream of sessions; a session emits one or more requests whose prompts are
built from shared or private `Segment`s and named by one `BlockChainer`, so the output has exactly the
schema of a real trace (see `trace.py`). Session kinds:

- ``chat``: a system prompt (Zipf over 50) then turns; each turn's prompt is the previous prompt, the
  previous answer and a new user message; think time between turns is exponential (mean 120 s);
- ``system``: one request, a shared system prompt (Zipf over 500, 1k-8k tokens) and a private question;
- ``rag``: one request, a short system prompt, 1-4 documents of a 20000-document corpus, the first drawn
  by Zipf popularity (the reuse is by frequency, not recency), and a question;
- ``agent``: a long tool prefix (Zipf over 100, 3k-12k tokens), a task, then 2-20 steps (mean 20 s
  apart), each appending the model's action and the tool's output (a loop over a growing context);
- ``scan``: one long private document (4k-32k tokens) to summarise, never reused.
Lengths are log-uniform in their ranges. Everything is drawn from one seeded `random.Random`.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from itertools import accumulate

from .chain import BlockChainer, Segment
from .trace import TraceRequest

Emit = list[tuple[float, list[Segment], int]]  # (arrival ms, prompt segments, output tokens)


@dataclass(frozen=True)
class WorkloadSpec:
    """How much trace to make: `requests` requests at about `rate_per_s` per second, from `seed`."""

    requests: int = 20_000
    seed: int = 0
    block_tokens: int = 512
    rate_per_s: float = 6.0

    def __post_init__(self) -> None:
        for name in ("requests", "block_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s={self.rate_per_s!r} must be > 0")


class _World:
    """The shared texts of one workload (lazily made pools) and its random source."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.rng = random.Random(spec.seed)
        self.chainer = BlockChainer(spec.block_tokens)
        self._pools: dict[str, tuple[list[Segment], list[float]]] = {}

    def length(self, lo: int, hi: int) -> int:
        return int(math.exp(self.rng.uniform(math.log(lo), math.log(hi + 1))))

    def text(self, lo: int, hi: int) -> Segment:
        return self.chainer.segment(self.length(lo, hi))

    def shared(self, pool: str, count: int, lo: int, hi: int, skew: float = 1.0) -> Segment:
        """One of `count` shared texts of pool `pool`, drawn with Zipf(`skew`) popularity."""
        if pool not in self._pools:
            texts = [self.text(lo, hi) for _ in range(count)]
            self._pools[pool] = (texts, list(accumulate(1.0 / (i + 1) ** skew for i in range(count))))
        texts, cum = self._pools[pool]
        return self.rng.choices(texts, cum_weights=cum)[0]

    def gap_ms(self, mean_s: float) -> float:
        return self.rng.expovariate(1.0 / mean_s) * 1e3


def _chat(w: _World, t: float) -> Emit:
    prompt = [w.shared("chat-system", 50, 300, 2000)]
    out: Emit = []
    for _ in range(min(30, 1 + int(w.rng.expovariate(1 / 3.5)))):
        prompt = prompt + [w.text(20, 1500)]
        answer = w.length(50, 800)
        out.append((t, prompt, answer))
        prompt = prompt + [w.chainer.segment(answer)]
        t += w.gap_ms(120.0)
    return out


def _system(w: _World, t: float) -> Emit:
    return [(t, [w.shared("system", 500, 1000, 8000), w.text(100, 3000)], w.length(50, 800))]


def _rag(w: _World, t: float) -> Emit:
    docs = [w.shared("corpus", 20000, 300, 3000) for _ in range(w.rng.randint(1, 4))]
    prompt = [w.shared("rag-system", 3, 200, 500), *docs, w.text(20, 200)]
    return [(t, prompt, w.length(50, 500))]


def _agent(w: _World, t: float) -> Emit:
    prompt = [w.shared("tools", 100, 3000, 12000), w.text(100, 800)]
    out: Emit = []
    for _ in range(w.rng.randint(2, 20)):
        action = w.length(50, 300)
        out.append((t, prompt, action))
        prompt = prompt + [w.chainer.segment(action), w.text(100, 3000)]
        t += w.gap_ms(20.0)
    return out


def _scan(w: _World, t: float) -> Emit:
    return [(t, [w.text(4000, 32000), w.text(20, 100)], w.length(100, 800))]


SESSIONS: dict[str, tuple[Callable[[_World, float], Emit], float]] = {
    # kind -> (session maker, mean requests per session: sets the session rate for `rate_per_s`)
    "chat": (_chat, 4.3),
    "system": (_system, 1.0),
    "rag": (_rag, 1.0),
    "agent": (_agent, 11.0),
    "scan": (_scan, 1.0),
}

WORKLOADS: dict[str, dict[str, float]] = {
    # workload -> session kind -> share of sessions
    "chat": {"chat": 1.0},
    "system": {"system": 1.0},
    "rag": {"rag": 0.9, "scan": 0.1},
    "agent": {"agent": 1.0},
    "mix": {"chat": 0.3, "system": 0.15, "rag": 0.3, "agent": 0.05, "scan": 0.2},
}


def generate_workload(name: str, spec: WorkloadSpec | None = None) -> list[TraceRequest]:
    """The first `spec.requests` requests (by arrival) of workload `name`; deterministic in `spec`."""
    shares = WORKLOADS.get(name)
    if shares is None:
        raise ValueError(f"unknown workload {name!r}; expected one of: {', '.join(sorted(WORKLOADS))}")
    spec = spec or WorkloadSpec()
    world = _World(spec)
    kinds = sorted(shares)
    cum = list(accumulate(shares[k] for k in kinds))
    mean_len = sum(shares[k] * SESSIONS[k][1] for k in kinds) / cum[-1]
    session_gap_s = mean_len / spec.rate_per_s
    heap: list[tuple[float, int, list[Segment], int]] = []
    t, made = 0.0, 0
    while made < spec.requests * 1.2 + 100:
        make = SESSIONS[world.rng.choices(kinds, cum_weights=cum)[0]][0]
        for stamp, segments, answer in make(world, t):
            heapq.heappush(heap, (stamp, made, segments, answer))
            made += 1
        t += world.gap_ms(session_gap_s)
    ordered = [heapq.heappop(heap) for _ in range(spec.requests)]
    return [
        TraceRequest(round(stamp, 3), sum(s.tokens for s in segs), answer, world.chainer.hash_ids(segs))
        for stamp, _, segs, answer in ordered
    ]
