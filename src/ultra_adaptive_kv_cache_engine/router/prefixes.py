"""What the router believes each instance has cached: chained digests of prompt text chunks.

The router tokenizes nothing. A request's prompt becomes one canonical text (chat: each message's role and
text, with separators no message contains; completion: the prompt), cut into chunks of `chunk_chars`
characters; chunk i's digest is BLAKE2b-64 of chunk i-1's digest and chunk i's text, so equal digests mean
equal prompt prefixes, as the instances' block hashes do for tokens. Only full chunks are named.

`InstancePrefixes` is one instance's set of digests, in least-recently-routed order and bounded (the
instance's pool is bounded too: it forgets what it evicts, the router forgets what it routed longest ago).
A request routed to an instance adds its digests there: the instance computes or loads that prefix, so the
next request sharing it finds it there. Dropped whole when the instance fails (a restarted instance has an
empty pool).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

ROLE_SEP, MESSAGE_SEP = "\x1f", "\x1e"


def prompt_text(body: Any) -> str:
    """The canonical prompt text of an OpenAI chat or completion body ('' when it names no prompt)."""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if isinstance(message, dict):
                parts.append(f"{message.get('role', '')}{ROLE_SEP}{_content_text(message.get('content'))}{MESSAGE_SEP}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return MESSAGE_SEP.join(str(p) for p in prompt)
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def chunk_digests(text: str, chunk_chars: int) -> list[bytes]:
    """The chained digests of the full `chunk_chars`-character chunks of `text`."""
    out: list[bytes] = []
    parent = b""
    for start in range(0, len(text) - chunk_chars + 1, chunk_chars):
        parent = hashlib.blake2b(parent + text[start : start + chunk_chars].encode(), digest_size=8).digest()
        out.append(parent)
    return out


class InstancePrefixes:
    """At most `capacity` digests believed cached on one instance, least recently routed first. O(1) each."""

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity={capacity!r} must be a positive integer")
        self.capacity = capacity
        self._digests: OrderedDict[bytes, None] = OrderedDict()

    def matched(self, digests: Sequence[bytes]) -> int:
        """How many leading `digests` are held (stops at the first one that is not)."""
        held = self._digests
        for i, digest in enumerate(digests):
            if digest not in held:
                return i
        return len(digests)

    def add(self, digests: Sequence[bytes]) -> None:
        """Marks `digests` as cached here (most recent, the root last so that it is forgotten after its
        children), forgetting the least recent beyond capacity."""
        held = self._digests
        for digest in reversed(digests):
            held[digest] = None
            held.move_to_end(digest)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def clear(self) -> None:
        self._digests.clear()

    def __len__(self) -> int:
        return len(self._digests)
