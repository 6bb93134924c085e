"""Text-request parameters of the `process` action, parsed and validated into one frozen object."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .requests import RequestError, check_fields

ROLES = ("system", "user", "assistant")
MAX_NEW_TOKENS_LIMIT = 4096
MAX_SEED = (1 << 64) - 1
"""Seeds are what a torch generator takes: integers from 0 to 2**64 - 1."""
PROCESS_FIELDS = frozenset({
    "action", "text", "messages", "raw", "stream", "max_new_tokens", "temperature", "top_p", "stop", "seed",
    "priority", "conversation_id", "user", "kv_press",
})
"""The fields a `process` request may carry; any other is refused (a typo must not be silently ignored)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to generate: greedy when temperature == 0."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _number(request: dict[str, Any], field: str, default: float, lo: float, hi: float, lo_open: bool) -> float:
    value = request.get(field, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RequestError(f"{field}={value!r} must be a finite number")
    if value < lo or value > hi or (lo_open and value == lo):
        bound = f"{'>' if lo_open else '>='} {lo} and <= {hi}"
        raise RequestError(f"{field}={value!r} is out of range; expected {bound}")
    return float(value)


def parse_sampling(request: dict[str, Any], default_max_new_tokens: int) -> SamplingParams:
    """SamplingParams from a request dict; RequestError naming the bad field (or a field no request has)."""
    check_fields(request, PROCESS_FIELDS, "process")
    max_new = request.get("max_new_tokens", default_max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS_LIMIT:
        raise RequestError(
            f"max_new_tokens={max_new!r} is out of range; expected an integer from 1 to {MAX_NEW_TOKENS_LIMIT}")
    stop = request.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"stop={request.get('stop')!r} must be a non-empty string or a list of them")
    seed = request.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise RequestError(f"seed={seed!r} must be an integer from 0 to 2**64 - 1, or None")
    return SamplingParams(
        max_new_tokens=max_new,
        temperature=_number(request, "temperature", 0.0, 0.0, 10.0, lo_open=False),
        top_p=_number(request, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        stop=tuple(stop),
        seed=seed,
    )


def parse_messages(request: dict[str, Any]) -> list[dict[str, str]] | None:
    """The chat messages of a request (None when it carries 'text'); RequestError when malformed."""
    raw = request.get("raw", False)
    if not isinstance(raw, bool):
        raise RequestError(f"raw={raw!r} must be true or false")
    if "messages" not in request:
        text = request.get("text")
        if not isinstance(text, str):
            raise RequestError(f"field 'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise RequestError("field 'text' is empty; expected a prompt with at least one non-space character")
        return None
    messages = request["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestError("field 'messages' must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise RequestError(f"messages[{i}]={m!r} must be a dict with keys 'role' and 'content'")
        if m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role={m['role']!r} is not valid; expected one of: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RequestError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    if not any(m["content"].strip() for m in messages):
        raise RequestError("every message in 'messages' is empty; expected at least one with content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]
