"""`CompletionService`: one checked OpenAI request run on the engine, answered whole or as server-sent events.

Order of the checks: the model name (404), the prompt's length (400, when a prompt limit is set), admission
(429), then the engine; for a stream the first chunk is awaited before the response starts, so an error
before the first token still gets its status code. The ticket is released and the engine's iterator closed
on every path.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, Response

from ..engine.stream import StreamChunk
from ..model.text import TextCodec
from .admission import Admission
from .config import ServerConfig
from .errors import bad_request, internal, model_not_found
from .generation import close_chunks, engine_chunks, next_chunk
from .protocol import ParsedRequest
from .responses import ResponseShape, ResponseWriter, usage
from .sse import EventStreamResponse, StreamState, sse_events

if TYPE_CHECKING:
    from ..engine.engine import UltraAdaptiveKVCacheEngine


class PromptLimit:
    """Counts a request's prompt tokens with the model's tokenizer, as the engine will encode them (chat
    template for messages, as is for a completion's prompt), and refuses prompts over `max_tokens`."""

    def __init__(self, tokenizer: TextCodec, max_tokens: int) -> None:
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def count(self, request: dict[str, Any]) -> int:
        if "messages" in request:
            return len(self.tokenizer.chat(request["messages"]))
        return len(self.tokenizer.encode(request["text"]))

    async def check(self, request: dict[str, Any]) -> None:
        n = await asyncio.to_thread(self.count, request)
        if n > self.max_tokens:
            param = "messages" if "messages" in request else "prompt"
            raise bad_request(f"the prompt is {n} tokens; this server accepts at most {self.max_tokens} "
                              "(max_prompt_tokens)", param=param, code="context_length_exceeded")


class CompletionService:
    """Runs requests for the one served model (see the module docstring)."""

    def __init__(self, engine: UltraAdaptiveKVCacheEngine, config: ServerConfig, model_name: str, admission: Admission,
                 prompt_limit: PromptLimit | None) -> None:
        self.engine, self.config, self.model_name = engine, config, model_name
        self.admission, self.prompt_limit = admission, prompt_limit

    async def complete(self, parsed: ParsedRequest, shape: ResponseShape) -> Response:
        if parsed.model != self.model_name:
            raise model_not_found(parsed.model, self.model_name)
        if self.prompt_limit is not None:
            await self.prompt_limit.check(parsed.engine_request)
        writer = ResponseWriter(shape, self.model_name, include_usage=parsed.include_usage)
        if parsed.stream:
            return await self._stream(parsed, writer)
        return await self._whole(parsed, writer)

    async def _whole(self, parsed: ParsedRequest, writer: ResponseWriter) -> Response:
        ticket = self.admission.admit()
        try:
            chunks = engine_chunks(self.engine, parsed.engine_request, self.config.retry_after_s)
        except BaseException:
            ticket.release()
            raise
        parts: list[str] = []
        last: StreamChunk | None = None
        try:
            while (chunk := await next_chunk(chunks, self.config.retry_after_s)) is not None:
                ticket.step(chunk.completion_tokens)
                parts.append(chunk.text)
                last = chunk
                if chunk.finish_reason is not None:
                    break
            if last is None:
                raise internal(RuntimeError("the engine ended the generation without a chunk"))
            reason = last.finish_reason or "stop"
            ticket.finish(reason, last.prompt_tokens, last.cached_tokens, last.completion_tokens)
        finally:  # an error answer is counted by the app's error handler
            await close_chunks(chunks)
            ticket.release()
        tokens = usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens)
        return JSONResponse(writer.whole("".join(parts), reason, tokens))

    async def _stream(self, parsed: ParsedRequest, writer: ResponseWriter) -> Response:
        ticket = self.admission.admit()
        try:
            chunks = engine_chunks(self.engine, parsed.engine_request, self.config.retry_after_s)
        except BaseException:
            ticket.release()
            raise
        try:
            first = await next_chunk(chunks, self.config.retry_after_s)
            if first is None:
                raise internal(RuntimeError("the engine ended the generation without a chunk"))
        except BaseException:  # an error answer is counted by the app's error handler
            await close_chunks(chunks)
            ticket.release()
            raise
        state = StreamState(first)
        body = sse_events(first, chunks, writer, ticket, self.config.retry_after_s, state)
        return EventStreamResponse(body, chunks, ticket, state)
