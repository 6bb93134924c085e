"""Validation of `process_request` dictionaries: one small function per action's fields."""

from __future__ import annotations

from typing import Any

import torch


class RequestError(ValueError):
    """A request dictionary is malformed; the message names the field and what was expected."""


def require_dict(request: Any) -> dict[str, Any]:
    if not isinstance(request, dict):
        raise RequestError(f"request must be a dict, got {type(request).__name__}")
    return request


def check_fields(request: dict[str, Any], allowed: frozenset[str], action: str) -> None:
    """RequestError naming every field of `request` that an `action` request does not have."""
    unknown = sorted(str(k) for k in request if k not in allowed)
    if unknown:
        raise RequestError(f"unknown field(s) {unknown} in a {action!r} request; expected some of: "
                           f"{', '.join(sorted(allowed))}")


def resolve_action(request: dict[str, Any], actions: list[str]) -> str:
    """The request's action; a request with 'text' or 'messages' and no action means 'process'."""
    action = request.get("action")
    if action is None and ("text" in request or "messages" in request):
        action = "process"
    if action is None:
        raise RequestError(f"request has no 'action'; expected one of: {', '.join(actions)}")
    if action not in actions:
        raise RequestError(f"unknown action {action!r}; expected one of: {', '.join(actions)}")
    return action


def require_tensor(request: dict[str, Any], field: str) -> torch.Tensor:
    if field not in request:
        raise RequestError(f"request for action {request.get('action')!r} is missing the field {field!r}")
    value = request[field]
    if not isinstance(value, torch.Tensor):
        raise RequestError(f"field {field!r} must be a torch.Tensor, got {type(value).__name__}")
    return value


def require_text(request: dict[str, Any]) -> str:
    if "text" not in request:
        raise RequestError("request for action 'process' needs the field 'text' or 'messages'")
    text = request["text"]
    if not isinstance(text, str):
        raise RequestError(f"field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise RequestError("field 'text' is empty; expected a prompt with at least one non-space character")
    return text
