"""What one streamed request measured (`RequestRecord`) and the reductions of bench_serving.py: percentiles,
one server's summary over a workload, the ratios ours / baseline and the goals. Pure: no I/O, no clock.

Definitions (vLLM's benchmark_serving.py uses the same ones):
- TTFT: from sending the request to its first content chunk.
- inter-token latency (ITL): the gaps between consecutive content chunks of a request, all requests pooled.
- TPOT: per request, (last chunk - first chunk) / (output tokens - 1), for requests of 2 tokens or more.
- output tokens: the usage's `completion_tokens` when the server sent a usage, else the content chunks.
- prefix hit rate: sum of `usage.prompt_tokens_details.cached_tokens` / sum of prompt tokens; None when the
  server reports no cached tokens.
- throughput: completed requests (output tokens) / the workload's wall time, i.e. the sum over rounds of
  (last answer - first send).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds, `sent_s` after its run started, chunk times after
    `sent_s`. `error` is None for a request answered in full."""

    server: str
    workload: str
    round: int
    client: int
    turn: int
    sent_s: float
    max_tokens: int
    chunk_s: list[float] = field(default_factory=list)
    done_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.done_s is not None

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens if self.completion_tokens is not None else len(self.chunk_s)

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] if self.chunk_s else None

    @property
    def tpot_s(self) -> float | None:
        n = self.output_tokens
        if len(self.chunk_s) < 2 or n < 2:
            return None
        return (self.chunk_s[-1] - self.chunk_s[0]) / (n - 1)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default);
    None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"q={q}; expected a percentile from 0 to 100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1e3, 2)


def wall_time(records: Iterable[RequestRecord]) -> float:
    """Sum over rounds of (last end - first send) of the records."""
    spans: dict[int, tuple[float, float]] = {}
    for r in records:
        end = r.done_s if r.done_s is not None else r.sent_s
        lo, hi = spans.get(r.round, (r.sent_s, end))
        spans[r.round] = (min(lo, r.sent_s), max(hi, end))
    return sum(hi - lo for lo, hi in spans.values())


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """One server's figures over one workload (see the module docstring)."""
    ok = [r for r in records if r.ok]
    duration = wall_time(records)
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens or 0 for r in ok)
    reported = [r.cached_tokens for r in ok if r.cached_tokens is not None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [b - a for r in ok for a, b in zip(r.chunk_s, r.chunk_s[1:], strict=False)]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    errors = [r.error for r in records if r.error is not None]
    return {
        "requests": len(records), "completed": len(ok), "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "duration_s": round(duration, 3),
        "request_throughput": round(len(ok) / duration, 4) if duration > 0 else None,
        "output_tok_s": round(output / duration, 3) if duration > 0 else None,
        "output_tokens": output, "prompt_tokens": prompt,
        "cached_tokens": sum(reported) if reported else None,
        "prefix_hit_rate": round(sum(reported) / prompt, 4) if reported and prompt else None,
        "ttft_ms_p50": _ms(percentile(ttft, 50)), "ttft_ms_p99": _ms(percentile(ttft, 99)),
        "itl_ms_p50": _ms(percentile(itl, 50)), "itl_ms_p99": _ms(percentile(itl, 99)),
        "tpot_ms_p50": _ms(percentile(tpot, 50)), "tpot_ms_p99": _ms(percentile(tpot, 99)),
    }


RATIO_KEYS = ("request_throughput", "output_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99",
              "tpot_ms_p50")


def ratios(ours: dict[str, Any], baseline: dict[str, Any], keys: Sequence[str] = RATIO_KEYS) -> dict[str, Any]:
    """ours / baseline for each key; None where either is missing or the baseline is 0."""
    out: dict[str, Any] = {}
    for key in keys:
        a, b = ours.get(key), baseline.get(key)
        out[key] = round(a / b, 4) if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    return out


def goal(label: str, value: float | None, target: str) -> dict[str, Any]:
    """A goal line: `target` is '>= X' or '<= X'; not met when the value is missing."""
    op, bound = target.split()
    met = value is not None and (value >= float(bound) if op == ">=" else value <= float(bound))
    return {"goal": label, "value": value, "target": target, "met": met}


def first_answers_identical(records: Sequence[RequestRecord], server_a: str, server_b: str) -> dict[str, int]:
    """How many first turns (same prompt on both servers) got the same answer text from both servers."""
    first = {(r.server, r.workload, r.round, r.client): r.text for r in records if r.turn == 0 and r.ok}
    same = total = 0
    for (server, workload, rnd, client), text in first.items():
        other = first.get((server_b, workload, rnd, client)) if server == server_a else None
        if other is not None:
            total += 1
            same += text == other
    return {"identical": same, "compared": total}
