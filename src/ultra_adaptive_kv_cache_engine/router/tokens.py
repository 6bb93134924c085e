"""`PromptTokenizer`: a request's prompt token ids, computed as the instances compute them.

An OpenAI body is checked with the server's own parsers (`server.protocol`: roles normalized, content parts
joined) and encoded as the model session encodes it (`ModelSession.encode_request`): chat messages through
the tokenizer's chat template (`TextCodec.chat`), a completion's prompt as text (`TextCodec.encode`). A body
the instances would refuse gives None (the instance answers the 400; the router routes it by text).

The tokenizer is the model folder's (`load`: `RouterConfig.model_path`, default the embedded SmolLM2, as
`uakv serve` resolves it; the tokenizer files only, no weights) or one given (tests: a tiny model's byte
codec). Its `identity` is the namespace's `tokenizer_id`: the router uses an instance's digest only when the
instance reports the same. A Hugging Face tokenizer is wrapped so that each message's encoding is remembered
(`MemoTextCodec`, bounded): a conversation's earlier turns and a shared system prompt are not re-encoded on
every request; the ids are those of the same `encode`, so they cannot differ.

Not thread-safe (a Hugging Face fast tokenizer switches `split_special_tokens` per call): the router runs every
encoding on one worker thread.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from ..model.text import HFTextCodec, TextCodec
from ..server.errors import APIError
from ..server.protocol import parse_chat, parse_completion

ANY_MAX_TOKENS = 1 << 62  # the router checks no limit of its own: the instance does
MEMO_ENTRIES = 4096


class MemoTextCodec(HFTextCodec):
    """An `HFTextCodec` remembering the ids of the last `MEMO_ENTRIES` texts it encoded (least recent first out)."""

    def __init__(self, tokenizer: Any, identity: str, entries: int = MEMO_ENTRIES) -> None:
        super().__init__(tokenizer, identity)
        self.entries = entries
        self._memo: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def encode(self, text: str) -> list[int]:
        ids = self._memo.get(text)
        if ids is None:
            ids = tuple(super().encode(text))
            self._memo[text] = ids
            if len(self._memo) > self.entries:
                self._memo.popitem(last=False)
        else:
            self._memo.move_to_end(text)
        return list(ids)


class PromptTokenizer:
    """Token ids of OpenAI bodies with `codec` (see the module docstring)."""

    def __init__(self, codec: TextCodec) -> None:
        self.codec: TextCodec = MemoTextCodec(codec.backend, codec.identity) if type(codec) is HFTextCodec else codec

    @classmethod
    def load(cls, model_path: str | None) -> PromptTokenizer:
        """The tokenizer of the model `model_path` names (None: the embedded SmolLM2), as `uakv serve` resolves
        it; ValueError when there is none."""
        from transformers import AutoTokenizer  # deferred: importing transformers is slow

        from ..config import KVCacheConfig
        from ..model.loader import resolve_model_folder, tokenizer_identity

        folder = resolve_model_folder(KVCacheConfig(model_path=model_path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"cannot load the tokenizer of {str(folder)!r}: {exc}") from exc
        return cls(MemoTextCodec(tokenizer, tokenizer_identity(folder)))

    @property
    def identity(self) -> str:
        return self.codec.identity

    def token_ids(self, path: str, body: Any) -> list[int] | None:
        """The prompt ids of `body` sent to `path` (/v1/chat/completions or /v1/completions); None when the
        instances would refuse it or it encodes to nothing."""
        try:
            if path.endswith("/chat/completions"):
                ids = self.codec.chat(parse_chat(body, ANY_MAX_TOKENS).engine_request["messages"])
            else:
                ids = self.codec.encode(parse_completion(body, ANY_MAX_TOKENS).engine_request["text"])
        except (APIError, ValueError, TypeError):
            return None
        return ids or None
