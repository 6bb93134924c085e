"""`ApiKeyMiddleware`: when the server has an API key, every HTTP request but `GET /health` must carry
`Authorization: Bearer <key>` (compared in constant time); others get the OpenAI 401 error."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, unauthorized
from .metrics import ServerMetrics

OPEN_PATHS = frozenset({"/health"})


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" else None
    return None


class ApiKeyMiddleware:
    """Pure ASGI middleware (it never touches a streamed body)."""

    def __init__(self, app: ASGIApp, api_key: str, metrics: ServerMetrics) -> None:
        self.app, self.key, self.metrics = app, api_key.encode(), metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token = _bearer(scope)
        if token is None:
            await self._refuse(unauthorized("missing API key"), send)
        elif not hmac.compare_digest(token.encode(), self.key):
            await self._refuse(unauthorized("incorrect API key"), send)
        else:
            await self.app(scope, receive, send)

    async def _refuse(self, error: APIError, send: Send) -> None:
        self.metrics.record_error(error.status)
        body = error.json_bytes()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
