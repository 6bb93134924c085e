"""OpenAI request bodies (`/v1/completions`, `/v1/chat/completions`) checked field by field and turned into
one `ParsedRequest` holding the engine's `process` request.

Every bad field raises `APIError` 400 naming the field, the value and what was expected; a field we do not
know is refused (as OpenAI does) rather than ignored, and a known feature we do not implement (n > 1,
logprobs, tools, penalties, ...) is accepted only at its neutral value. Defaults are OpenAI's documented
ones (temperature 1, top_p 1); an absent `max_tokens` means the engine's `max_new_tokens`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import bad_request

OPENAI_TEMPERATURE = 1.0  # OpenAI's documented default
MAX_TEMPERATURE = 2.0
MAX_STOP = 4
ROLE_ALIASES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

COMMON_FIELDS = ("model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options",
                 "user")
# Known features we do not implement: accepted only at these neutral values.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
    "top_logprobs": (0,), "best_of": (1,), "echo": (False,), "suffix": ("",), "tools": ([],),
    "tool_choice": ("none",), "parallel_tool_calls": (True, False), "response_format": ({"type": "text"},),
    "metadata": ({},), "store": (False,), "service_tier": ("auto", "default"),
}


@dataclass(frozen=True)
class ParsedRequest:
    """A checked OpenAI request: the served `model` it named, whether to `stream` and with a usage chunk, and
    the engine's `process` request (`engine_request`)."""

    model: str
    stream: bool
    include_usage: bool
    engine_request: dict[str, Any]
    max_new_tokens: int | None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _check_fields(body: dict[str, Any], own: tuple[str, ...]) -> None:
    known = set(COMMON_FIELDS) | set(own) | set(NEUTRAL)
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unrecognized request argument(s) {unknown}; expected some of: "
                          f"{', '.join(sorted(set(COMMON_FIELDS) | set(own)))}", param=unknown[0])
    for name, neutral in NEUTRAL.items():
        value = body.get(name)
        if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
            shown = " or ".join(repr(v) for v in neutral)
            raise bad_request(f"{name}={_short(value)} is not supported by this server; expected {shown} or null",
                              param=name)


def _optional(body: dict[str, Any], name: str, check: Callable[[Any], bool], expected: str) -> Any:
    value = body.get(name)
    if value is not None and not check(value):
        raise bad_request(f"{name}={_short(value)} is invalid; expected {expected}", param=name)
    return value


def _stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= MAX_STOP or not all(
            isinstance(s, str) and s for s in stops):
        raise bad_request(f"stop={_short(stop)} is invalid; expected a non-empty string or a list of 1 to {MAX_STOP} "
                          "non-empty strings", param="stop")
    return stops


def _include_usage(body: dict[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(
            options.get("include_usage", False), bool):
        raise bad_request(f"stream_options={options!r} is invalid; expected {{\"include_usage\": true|false}}",
                          param="stream_options")
    return bool(options.get("include_usage", False))


def _max_tokens(body: dict[str, Any], names: tuple[str, ...], limit: int) -> int | None:
    given = [n for n in names if body.get(n) is not None]
    if len(given) > 1:
        raise bad_request(f"give one of {' or '.join(names)}, not both", param=given[1])
    if not given:
        return None
    name, value = given[0], body[given[0]]
    if not _is_int(value) or not 1 <= value <= limit:
        raise bad_request(f"{name}={_short(value)} is invalid; expected an integer from 1 to {limit} (this server's "
                          "limit)", param=name)
    return value


def parse_common(body: Any, own: tuple[str, ...], max_tokens_names: tuple[str, ...],
                 max_tokens_limit: int) -> tuple[ParsedRequest, dict[str, Any]]:
    """The fields both routes share: a `ParsedRequest` whose engine request holds the sampling parameters
    (the route adds the prompt), and the body as a dict."""
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got a JSON {type(body).__name__}")
    _check_fields(body, own)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request(f"model={_short(model)} is invalid; expected the name of a served model (GET /v1/models)",
                          param="model")
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "true or false") or False
    n = _optional(body, "n", _is_int, "1")
    if n is not None and n != 1:
        raise bad_request(f"n={n!r} is not supported; this server returns exactly one choice (n=1)", param="n")
    temperature = _optional(body, "temperature", lambda v: _is_number(v) and 0 <= v <= MAX_TEMPERATURE,
                            f"a number from 0 to {MAX_TEMPERATURE}")
    top_p = _optional(body, "top_p", lambda v: _is_number(v) and 0 < v <= 1, "a number > 0 and <= 1")
    seed = _optional(body, "seed", lambda v: _is_int(v) and v >= 0, "a non-negative integer")
    _optional(body, "user", lambda v: isinstance(v, str), "a string")
    request: dict[str, Any] = {
        "action": "process",
        "temperature": float(OPENAI_TEMPERATURE if temperature is None else temperature),
        "top_p": float(1.0 if top_p is None else top_p),
    }
    max_new = _max_tokens(body, max_tokens_names, max_tokens_limit)
    if max_new is not None:
        request["max_new_tokens"] = max_new
    stop = _stop(body)
    if stop is not None:
        request["stop"] = stop
    if seed is not None:
        request["seed"] = seed
    parsed = ParsedRequest(model=model, stream=stream, include_usage=_include_usage(body, stream),
                           engine_request=request, max_new_tokens=max_new)
    return parsed, body


def _content(i: int, content: Any) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request(f"messages[{i}].content[{j}]={_short(part)} is not supported; expected "
                                  "{\"type\": \"text\", \"text\": \"...\"}", param=f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise bad_request(f"messages[{i}].content={_short(content)} is invalid; expected a string or a list of text parts",
                      param=f"messages[{i}].content")


def parse_chat(body: Any, max_tokens_limit: int) -> ParsedRequest:
    """A `/v1/chat/completions` body; the engine request carries `messages` (roles system, user, assistant;
    developer is read as system)."""
    parsed, body = parse_common(body, ("messages", "max_completion_tokens"), ("max_tokens", "max_completion_tokens"),
                                max_tokens_limit)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request(f"messages={_short(messages)} is invalid; expected a non-empty list of "
                          "{\"role\": ..., \"content\": ...} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m or set(m) - {"role", "content", "name"}:
            raise bad_request(f"messages[{i}]={_short(m)} is invalid; expected an object with 'role' and 'content' "
                              "(and optionally 'name')", param=f"messages[{i}]")
        role = ROLE_ALIASES.get(m["role"]) if isinstance(m["role"], str) else None
        if role is None:
            raise bad_request(f"messages[{i}].role={_short(m['role'])} is not supported; expected one of: "
                              f"{', '.join(ROLE_ALIASES)}", param=f"messages[{i}].role")
        out.append({"role": role, "content": _content(i, m["content"])})
    if not any(m["content"].strip() for m in out):
        raise bad_request("every message is empty; expected at least one with content", param="messages")
    parsed.engine_request["messages"] = out
    return parsed


def parse_completion(body: Any, max_tokens_limit: int) -> ParsedRequest:
    """A `/v1/completions` body; the prompt (a string, or a list of one string) goes to the model as is."""
    parsed, body = parse_common(body, ("prompt",), ("max_tokens",), max_tokens_limit)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request(f"prompt={_short(prompt)} is not supported; expected a string or a list of one string "
                          "(token-id prompts and batches are not served)", param="prompt")
    if not prompt.strip():
        raise bad_request("prompt is empty; expected at least one non-space character", param="prompt")
    parsed.engine_request.update(text=prompt, raw=True)
    return parsed


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
