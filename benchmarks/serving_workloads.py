"""The two workloads of bench_serving.py, built before any server runs (pure: no torch, no HTTP).

- `chat_workload`: N clients, each a conversation of several turns. Client i shares system prompt
  i % `system_prompts` with the others (long, real text); every turn's user message is a fresh slice of real
  text; a client thinks (exponential, mean `think_s`) between an answer and its next turn. Conversations
  start open-loop (exponential gaps of mean `start_gap_s`); within one conversation a turn is sent when the
  previous answer arrived plus the think time (it carries that answer in its history).
- `trace_workload`: the rows of an arrival trace (Azure LLM inference 2023 schema: `TIMESTAMP,
  ContextTokens, GeneratedTokens`), arrivals `time_scale` times slower than recorded, prompt and output
  lengths scaled by `length_scale` / `output_scale` and clamped to what the model and the machine allow;
  each prompt is that many tokens of real text from a seeded offset.

Invariant: the same spec, text and seed give the same workload, byte for byte (both servers get the same).
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

TRACE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


@dataclass(frozen=True)
class ChatSpec:
    """Sizes of the multi-turn chat workload (words of real text, seconds)."""

    clients: int = 8
    turns: int = 4
    system_prompts: int = 2
    system_words: int = 450
    user_words: tuple[int, int] = (25, 60)
    max_tokens: int = 32
    think_s: float = 1.0
    start_gap_s: float = 0.5


@dataclass(frozen=True)
class Conversation:
    """One client's script: when it starts (seconds after the run starts), its system prompt, its user
    messages in order, the think time after each answer, and max_tokens of every turn."""

    client: int
    start_s: float
    system: str
    users: tuple[str, ...]
    think_s: tuple[float, ...]
    max_tokens: int


@dataclass(frozen=True)
class TraceRow:
    """One trace row: arrival in seconds after the first selected row, and its token counts."""

    t_s: float
    context_tokens: int
    generated_tokens: int


@dataclass(frozen=True)
class TraceSpec:
    """How trace rows become requests on this machine."""

    time_scale: float = 4.0
    length_scale: float = 0.25
    output_scale: float = 0.25
    min_prompt_tokens: int = 16
    max_prompt_tokens: int = 512
    max_output_tokens: int = 32


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace replay: sent `arrival_s` after the run starts, a prompt of `prompt_tokens`
    tokens of real text, at most `max_tokens` new tokens; `row` is the trace row it came from."""

    index: int
    arrival_s: float
    prompt: str
    prompt_tokens: int
    max_tokens: int
    row: TraceRow


def _slice(words: Sequence[str], n: int, rng: random.Random) -> str:
    if n > len(words):
        raise ValueError(f"asked for {n} words of text; the text has only {len(words)}")
    start = rng.randrange(len(words) - n + 1)
    return " ".join(words[start : start + n])


def chat_workload(spec: ChatSpec, text: str, seed: int) -> list[Conversation]:
    """The conversations of `spec`, drawn from `text` (see the module docstring)."""
    if spec.clients < 1 or spec.turns < 1 or spec.system_prompts < 1:
        raise ValueError(f"{spec}: clients, turns and system_prompts must be >= 1")
    rng = random.Random(seed)
    words = text.split()
    systems = [_slice(words, spec.system_words, rng) for _ in range(spec.system_prompts)]
    out, start = [], 0.0
    for client in range(spec.clients):
        users = tuple(_slice(words, rng.randint(*spec.user_words), rng) for _ in range(spec.turns))
        think = tuple(rng.expovariate(1.0 / spec.think_s) if spec.think_s > 0 else 0.0 for _ in range(spec.turns))
        out.append(Conversation(client, round(start, 6), systems[client % len(systems)], users, think,
                                spec.max_tokens))
        start += rng.expovariate(1.0 / spec.start_gap_s) if spec.start_gap_s > 0 else 0.0
    return out


def _parse_timestamp(value: str) -> float:
    """Seconds since the epoch (naive, as written) of 'YYYY-MM-DD HH:MM:SS[.fraction]' (any fraction digits)."""
    main, _, fraction = value.strip().partition(".")
    base = datetime.strptime(main, "%Y-%m-%d %H:%M:%S")
    return (base - datetime(1970, 1, 1)).total_seconds() + (float("0." + fraction) if fraction else 0.0)


def read_trace(path: Path, start: int = 0, limit: int | None = None) -> list[TraceRow]:
    """Rows `start` to `start + limit` of an Azure-schema CSV, times relative to the first of them."""
    with Path(path).open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != TRACE_COLUMNS:
            raise ValueError(f"{path}: header {header!r}; expected {','.join(TRACE_COLUMNS)}")
        rows: list[tuple[float, int, int]] = []
        for i, record in enumerate(reader):
            if i < start:
                continue
            if limit is not None and len(rows) >= limit:
                break
            rows.append((_parse_timestamp(record[0]), int(record[1]), int(record[2])))
    if not rows:
        raise ValueError(f"{path}: no rows from row {start}")
    t0 = rows[0][0]
    return [TraceRow(round(t - t0, 6), ctx, gen) for t, ctx, gen in rows]


def _clamp(value: float, low: int, high: int) -> int:
    return max(low, min(high, round(value)))


def trace_workload(rows: Sequence[TraceRow], spec: TraceSpec, tokens: Sequence[int],
                   decode: Callable[[Sequence[int]], str], seed: int) -> list[TraceRequest]:
    """Requests replaying `rows` (see the module docstring); `tokens` is real text already tokenized by the
    served model's tokenizer and `decode` turns a slice of it back into the prompt's text."""
    if spec.time_scale <= 0:
        raise ValueError(f"time_scale={spec.time_scale}; expected > 0")
    if len(tokens) < spec.max_prompt_tokens:
        raise ValueError(f"{len(tokens)} tokens of text; expected at least max_prompt_tokens={spec.max_prompt_tokens}")
    rng = random.Random(seed)
    out = []
    for i, row in enumerate(rows):
        n = _clamp(row.context_tokens * spec.length_scale, spec.min_prompt_tokens, spec.max_prompt_tokens)
        new = _clamp(row.generated_tokens * spec.output_scale, 1, spec.max_output_tokens)
        start = rng.randrange(len(tokens) - n + 1)
        out.append(TraceRequest(i, round(row.t_s * spec.time_scale, 6), decode(tokens[start : start + n]), n, new,
                                row))
    return out
