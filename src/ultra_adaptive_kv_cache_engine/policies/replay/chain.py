"""Prefix-chained block ids for synthetic prompts made of segments (the Mooncake `hash_ids` rule)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """A run of `tokens` tokens of one piece of text (a system prompt, a document, a user turn...).

    Two segments with the same `uid` are the same text; `uid`s come from `BlockChainer.segment`.
    """

    uid: int
    tokens: int


class BlockChainer:
    """Names the blocks of prompts so that equal ids mean equal prefixes.

    A block's content is the list of (segment uid, start, end) pieces it covers; its id is assigned on
    first sight of (parent id, content), so block i of two prompts has the same id exactly when the two
    prompts agree on their first (i + 1) * block_tokens tokens (a partial last block only matches an
    equally partial one). Ids are consecutive ints from 0, deterministic for a given sequence of calls.
    """

    def __init__(self, block_tokens: int = 512) -> None:
        if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens!r} must be a positive integer")
        self.block_tokens = block_tokens
        self._ids: dict[tuple[int, tuple[tuple[int, int, int], ...]], int] = {}
        self._segments = 0

    def segment(self, tokens: int) -> Segment:
        """A new piece of text of `tokens` tokens, distinct from every other."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens={tokens!r} must be a positive integer")
        self._segments += 1
        return Segment(self._segments, tokens)

    def hash_ids(self, segments: list[Segment]) -> tuple[int, ...]:
        """The block ids of the prompt made of `segments` in order (ceil(total tokens / block_tokens))."""
        out: list[int] = []
        pieces: list[tuple[int, int, int]] = []
        parent, filled, bt = -1, 0, self.block_tokens
        for seg in segments:
            start = 0
            while start < seg.tokens:
                take = min(seg.tokens - start, bt - filled)
                pieces.append((seg.uid, start, start + take))
                filled += take
                start += take
                if filled == bt:
                    parent = self._name(parent, pieces)
                    out.append(parent)
                    pieces, filled = [], 0
        if pieces:
            out.append(self._name(parent, pieces))
        return tuple(out)

    def _name(self, parent: int, pieces: list[tuple[int, int, int]]) -> int:
        return self._ids.setdefault((parent, tuple(pieces)), len(self._ids))
