"""What a streamed generation yields: one `StreamChunk` per step that produced text, the last one finished.

The contract between the engine (`UltraAdaptiveKVCacheEngine.stream(request)`, or `process_request` with
``"stream": True``) and its consumers (the HTTP server, the CLI):
- chunks arrive in order; concatenating every chunk's `text` gives the whole completion (stop strings cut);
- exactly the last chunk has a `finish_reason`: "stop" (eos or a stop string), "length" (max_new_tokens) or
  "cancelled"; a consumer that stops iterating (closes the iterator) cancels the generation and its blocks
  are freed at once;
- `prompt_tokens`, `cached_tokens` are fixed from the first chunk on; `completion_tokens` counts the tokens
  generated so far (a chunk may carry no text when a token ends inside a multi-byte character);
- a consumer that falls behind the steps gets the chunks it has not read yet merged into one (`merge_chunks`:
  texts and token ids concatenated, the counts and finish reason of the last), so a slow reader costs one
  chunk per read, not one per step; what the chunks concatenate to is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class StreamChunk:
    """One step of a streamed generation (see the module docstring)."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    def __post_init__(self) -> None:
        if self.finish_reason is not None and self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason={self.finish_reason!r}; expected None or one of {FINISH_REASONS}")


def merge_chunks(chunks: Sequence[StreamChunk]) -> StreamChunk:
    """One chunk standing for consecutive `chunks` of one stream (in order; only the last may be finished):
    their texts and token ids concatenated, the counts and finish reason of the last."""
    if not chunks:
        raise ValueError("merge_chunks needs at least one chunk")
    if len(chunks) == 1:
        return chunks[0]
    if any(c.finish_reason is not None for c in chunks[:-1]):
        raise ValueError("merge_chunks: only the last chunk of a stream may carry a finish_reason")
    last = chunks[-1]
    return StreamChunk(
        text="".join(c.text for c in chunks), token_ids=sum((c.token_ids for c in chunks), ()),
        finish_reason=last.finish_reason, prompt_tokens=last.prompt_tokens, cached_tokens=last.cached_tokens,
        completion_tokens=last.completion_tokens,
    )
