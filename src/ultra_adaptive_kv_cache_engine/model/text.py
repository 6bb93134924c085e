"""`TextCodec`: text <-> token ids, the one tokenizer interface the rest of the package sees.

Two implementations: `HFTextCodec` wraps a Hugging Face tokenizer (the real models), `ByteTextCodec` maps
UTF-8 bytes to ids (the tiny random test models, no tokenizer files). Both are deterministic, and both name
themselves through `identity` (a SHA-256 hex digest of what defines the mapping), which is the prefix
namespace's `tokenizer_id`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

Message = Mapping[str, str]


@runtime_checkable
class TextCodec(Protocol):
    """Text in, token ids out, and back."""

    @property
    def identity(self) -> str: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]: ...


def _require_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text


def _require_messages(messages: object) -> list[dict[str, str]]:
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError(f"messages={messages!r} must be a non-empty list of {{'role', 'content'}} mappings")
    out: list[dict[str, str]] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            raise ValueError(f"messages[{i}]={message!r} must be a mapping with 'role' and 'content'")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise ValueError(f"messages[{i}] role and content must be strings, got {message!r}")
        out.append({"role": message["role"], "content": message["content"]})
    return out


class HFTextCodec:
    """A Hugging Face tokenizer behind the `TextCodec` interface (`backend` is the tokenizer itself)."""

    def __init__(self, tokenizer: Any, identity: str) -> None:
        self.backend = tokenizer
        self._identity = identity

    @property
    def identity(self) -> str:
        return self._identity

    @property
    def eos_token_id(self) -> int | None:
        return self.backend.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.backend.pad_token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as TEXT: special-token text typed by a user (`<|im_start|>system`) is split into
        ordinary tokens, never encoded as the special token (no forged turns); no special tokens are added."""
        return list(self.backend.encode(_require_text(text), add_special_tokens=False, split_special_tokens=True))

    def _encode_template(self, text: str) -> list[int]:
        """Token ids of template text, whose special-token text IS special (the template's own markers)."""
        return list(self.backend.encode(text, add_special_tokens=False, split_special_tokens=False))

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids`, special tokens skipped."""
        return self.backend.decode(list(token_ids), skip_special_tokens=True)

    def chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` rendered by the tokenizer's chat template (plain join if it has none)."""
        checked = _require_messages(messages)
        if getattr(self.backend, "chat_template", None) is None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in checked)
            return self.encode(text + ("assistant: " if add_generation_prompt else ""))
        return self._chat_template_ids(checked, add_generation_prompt)

    def _chat_template_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        """The template rendered with a unique marker in place of each message's content; the template's text
        between markers is encoded with its special tokens, each content as text (`encode`). A template that
        does not carry the markers through verbatim is rendered with the contents and encoded as text around
        its own special tokens only where no content holds special-token text (else ValueError)."""
        marks = [f"\x00uakv-content-{i}-{secrets.token_hex(8)}\x00" for i in range(len(messages))]
        marked = [{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)]
        text = self.backend.apply_chat_template(marked, add_generation_prompt=add_generation_prompt, tokenize=False)
        ids: list[int] = []
        rest = text
        for message, mark in zip(messages, marks, strict=True):
            head, found, rest = rest.partition(mark)
            if not found:
                return self._chat_fallback(messages, add_generation_prompt)
            ids += self._encode_template(head) + (self.encode(message["content"]) if message["content"] else [])
        return ids + self._encode_template(rest)

    def _chat_fallback(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
        specials = [t for t in getattr(self.backend, "all_special_tokens", []) if t]
        if any(t in m["content"] for m in messages for t in specials):
            raise ValueError("a message holds special-token text and this chat template rewrites contents, so it "
                             "cannot be encoded as text; remove the special-token text")
        text = self.backend.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        return self._encode_template(text)


class ByteTextCodec:
    """UTF-8 bytes as ids: id = byte + `offset`; ids below `offset` are specials (0 pad, 1 bos, 2 eos).

    Needs a vocabulary of at least 256 + offset ids; ids outside the byte range decode to nothing.
    """

    PAD, BOS, EOS = 0, 1, 2

    def __init__(self, offset: int = 3) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 3:
            raise ValueError(f"offset={offset!r} must be an integer >= 3 (ids 0..2 are pad, bos, eos)")
        self.offset = offset

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    @property
    def identity(self) -> str:
        spec = json.dumps({"codec": "bytes", "offset": self.offset}, sort_keys=True).encode()
        return hashlib.sha256(spec).hexdigest()

    @property
    def eos_token_id(self) -> int:
        return self.EOS

    @property
    def pad_token_id(self) -> int:
        return self.PAD

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in _require_text(text).encode("utf-8")]

    def decode(self, token_ids: Sequence[int]) -> str:
        data = bytes(i - self.offset for i in token_ids if self.offset <= i < self.offset + 256)
        return data.decode("utf-8", errors="replace")

    def chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """`<bos>role: content<eos>` per message, then `<bos>assistant: ` when asked."""
        ids: list[int] = []
        for m in _require_messages(messages):
            ids += [self.BOS, *self.encode(f"{m['role']}: {m['content']}"), self.EOS]
        if add_generation_prompt:
            ids += [self.BOS, *self.encode("assistant: ")]
        return ids
