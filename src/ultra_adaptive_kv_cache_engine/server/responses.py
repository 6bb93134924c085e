"""OpenAI response objects for one generation: the whole answer, the streamed chunks and the usage, for both
routes. `ResponseShape` is what differs between `/v1/completions` (`text_completion`, choices carry `text`)
and `/v1/chat/completions` (`chat.completion`, choices carry a `message` or a `delta`)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    """OpenAI's usage object; `prompt_tokens_details.cached_tokens` is the prompt's reused prefix."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass(frozen=True)
class ResponseShape:
    """The names one route's objects use."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        """A streamed choice: `text` None is the chat's opening delta (the role), "" with a reason the last."""
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if text is None:
            delta: dict[str, Any] = {"role": "assistant", "content": ""}
        else:
            delta = {"content": text} if text or finish_reason is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


CHAT = ResponseShape("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
COMPLETION = ResponseShape("cmpl-", "text_completion", "text_completion", chat=False)


@dataclass
class ResponseWriter:
    """Builds the objects of one response; every object of one response shares its id and creation time."""

    shape: ResponseShape
    model: str
    include_usage: bool = False
    id: str = field(default="")
    created: int = field(default=0)
    _content: tuple[bytes, bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.id = self.id or f"{self.shape.id_prefix}{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, tokens: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed answer; `tokens` is a `usage(...)` object."""
        return {**self._head(self.shape.object), "choices": [self.shape.choice(text, finish_reason)],
                "usage": tokens}

    def chunk(self, text: str | None, finish_reason: str | None = None) -> dict[str, Any]:
        """One streamed chunk (see `ResponseShape.delta`); its `usage` is null when the client asked for a
        usage chunk at the end."""
        out = {**self._head(self.shape.chunk_object), "choices": [self.shape.delta(text, finish_reason)]}
        if self.include_usage:
            out["usage"] = None
        return out

    def content_event(self, text: str) -> bytes:
        """The server-sent event of `self.chunk(text)` (a content delta, no finish reason), built from bytes
        made once per response: only `text` is encoded per event (the same bytes as `sse_event` writes)."""
        if self._content is None:
            marker = f"<uakv-content-{uuid.uuid4().hex}>"
            framed = sse_event(self.chunk(marker))
            head, sep, tail = framed.partition(encode_basestring(marker).encode())
            assert sep and sep not in tail, "the marker occurs once in the chunk"
            self._content = (head, tail)
        head, tail = self._content
        return head + encode_basestring(text).encode() + tail

    def usage_chunk(self, tokens: dict[str, Any]) -> dict[str, Any]:
        """The last chunk before [DONE] when `stream_options.include_usage` is set: no choices, the usage."""
        return {**self._head(self.shape.chunk_object), "choices": [], "usage": tokens}


def sse_event(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as JSON (UTF-8, not ASCII-escaped)."""
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"
