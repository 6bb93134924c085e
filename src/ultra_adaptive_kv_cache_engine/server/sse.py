"""Server-sent events for a streamed completion: `data: {json}\\n\\n` per chunk, an optional usage chunk, then
`data: [DONE]\\n\\n` (OpenAI's framing).

`sse_events` turns the engine's chunks into events: chat streams open with the role, then one event per
chunk that carries text (one step's text, or several steps' merged when this response fell behind the
engine: `ChunkStream` merges what was not read yet, so a slow client gets fewer, longer deltas), then an
empty delta carrying the finish reason. Content events are built from bytes made once per response
(`ResponseWriter.content_event`). An engine failure after the headers went out is sent as an
`{"error": ...}` event before [DONE]. `EventStreamResponse` guarantees the cleanup: whether the stream ends,
fails, or the client disconnects (Starlette cancels the body), the engine's iterator is closed (the
generation is cancelled and its blocks freed) and the request's ticket is released, with the request counted
as `cancelled` when it did not finish.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.stream import StreamChunk
from .admission import Ticket
from .errors import APIError
from .generation import close_chunks, next_chunk
from .responses import ResponseWriter, sse_event, usage

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StreamState:
    """What one stream has seen: the last chunk, and whether the request finished."""

    def __init__(self, first: StreamChunk) -> None:
        self.last = first
        self.finished = False


async def sse_events(first: StreamChunk, chunks: AsyncIterator[StreamChunk], writer: ResponseWriter,
                     ticket: Ticket, retry_after_s: int, state: StreamState) -> AsyncIterator[bytes]:
    """The events of one streamed response whose first chunk was already taken (so errors before any token
    could still be answered with a status)."""
    if writer.shape.chat:
        yield sse_event(writer.chunk(None))
    chunk: StreamChunk | None = first
    try:
        while chunk is not None:
            state.last = chunk
            ticket.step(chunk.completion_tokens)
            if chunk.text:
                yield writer.content_event(chunk.text)
            if chunk.finish_reason is not None:
                break
            chunk = await next_chunk(chunks, retry_after_s)
    except APIError as exc:
        state.finished = True
        ticket.fail(exc.status)
        yield sse_event(exc.body())
        yield DONE
        return
    last = state.last
    reason = last.finish_reason or "stop"
    yield sse_event(writer.chunk("", reason))
    if writer.include_usage:
        yield sse_event(writer.usage_chunk(usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)))
    yield DONE
    state.finished = True
    ticket.finish(reason, last.prompt_tokens, last.cached_tokens, last.completion_tokens)


class EventStreamResponse(StreamingResponse):
    """A `text/event-stream` response over `sse_events` that always closes the engine's iterator and releases
    the ticket (see the module docstring)."""

    def __init__(self, body: AsyncIterator[bytes], chunks: AsyncIterator[StreamChunk], ticket: Ticket,
                 state: StreamState) -> None:
        super().__init__(body, media_type="text/event-stream", headers=HEADERS)
        self.chunks, self.ticket, self.state = chunks, ticket, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await close_chunks(self.body_iterator)  # type: ignore[arg-type]
            await close_chunks(self.chunks)
            if not self.state.finished and not self.ticket.released:
                last = self.state.last
                self.ticket.finish("cancelled", last.prompt_tokens, last.cached_tokens, last.completion_tokens)
