"""One request's generation as the engine's `StreamChunk`s (the contract of `engine/stream.py`), and the
engine's failures as OpenAI errors.

`engine_chunks` and `next_chunk` map the engine's exceptions: a `RequestError` is the client's fault (400),
a full engine queue is a 429, anything else a 500 (logged). `close_chunks` closes the iterator whatever the caller's cancellation state, so the engine cancels
the generation and frees its blocks even when the client has gone.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from ..engine.requests import RequestError
from ..engine.scheduler import QueueFullError
from ..engine.stream import StreamChunk
from ..metrics import LOGGER_NAME
from .errors import APIError, bad_request, internal

if TYPE_CHECKING:
    from ..engine.engine import UltraAdaptiveKVCacheEngine

logger = logging.getLogger(LOGGER_NAME)

def engine_chunks(engine: UltraAdaptiveKVCacheEngine, request: dict[str, Any], retry_after_s: int) -> AsyncIterator[StreamChunk]:
    """`engine.stream(request)`: the engine validates the request now (its errors mapped as in
    `engine_error`); the generation starts when the first chunk is asked for."""
    try:
        return engine.stream(request)
    except Exception as exc:  # noqa: BLE001 - every engine failure becomes an OpenAI error answer
        raise engine_error(exc, retry_after_s) from exc


def engine_error(exc: Exception, retry_after_s: int) -> APIError:
    """The OpenAI error for an exception the engine raised."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(429, f"the engine's queue is full: {exc}; retry after {retry_after_s} s",
                        type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after_s)})
    if isinstance(exc, RequestError):  # the engine names its own field; the client sent max_tokens
        return bad_request(str(exc).replace("max_new_tokens", "max_tokens"))
    logger.exception("the engine failed on a request")
    return internal(exc)


async def next_chunk(chunks: AsyncIterator[StreamChunk], retry_after_s: int) -> StreamChunk | None:
    """The next chunk, None at the end; the engine's exceptions as `APIError` (see `engine_error`)."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        return None
    except Exception as exc:  # noqa: BLE001 - every engine failure becomes an OpenAI error answer
        raise engine_error(exc, retry_after_s) from exc


async def close_chunks(chunks: AsyncIterator[StreamChunk]) -> None:
    """Closes the engine's iterator (cancels its generation), shielded from the caller's cancellation."""
    aclose = getattr(chunks, "aclose", None)
    if aclose is None:
        return
    with anyio.CancelScope(shield=True):
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - closing must not mask the response's own outcome
            logger.exception("closing the engine's stream failed")
