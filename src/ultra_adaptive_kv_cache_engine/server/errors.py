"""OpenAI error objects: every failure the server answers is `{"error": {"message", "type", "param", "code"}}`
with a 4xx or 5xx status, so the official clients raise their typed errors (BadRequestError, NotFoundError,
AuthenticationError, RateLimitError, ...) with our message."""

from __future__ import annotations

import json
from typing import Any

INVALID_REQUEST = "invalid_request_error"


class APIError(Exception):
    """One error answer: HTTP `status`, an OpenAI error `type`, the request field at fault (`param`), a machine
    `code`, and extra response `headers` (Retry-After, WWW-Authenticate). (Not a frozen dataclass: context
    managers set attributes on the exceptions that pass through them.)"""

    def __init__(self, status: int, message: str, type: str = INVALID_REQUEST, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str, served: str) -> APIError:
    return APIError(404, f"The model {model!r} does not exist; this server serves {served!r}",
                    param="model", code="model_not_found")


def route_not_found(method: str, path: str) -> APIError:
    return APIError(404, f"No route {method} {path}; see GET /v1/models, POST /v1/completions and "
                    "POST /v1/chat/completions", code="not_found")


def method_not_allowed(method: str, path: str) -> APIError:
    return APIError(405, f"Method {method} is not allowed on {path}", code="method_not_allowed")


def unauthorized(reason: str) -> APIError:
    return APIError(401, f"{reason}; send the header 'Authorization: Bearer <API key>'",
                    type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def body_too_large(size: int | None, limit: int) -> APIError:
    got = "larger" if size is None else f"{size} bytes"
    return APIError(413, f"request body is {got}; the limit is {limit} bytes (ServerConfig.max_body_bytes)",
                    code="request_too_large")


def queue_full(in_flight: int, limit: int, retry_after_s: int) -> APIError:
    return APIError(429, f"the server has {in_flight} requests in flight, its limit is {limit}; retry after "
                    f"{retry_after_s} s", type="rate_limit_error", code="queue_full",
                    headers={"Retry-After": str(retry_after_s)})


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down and takes no new requests", type="server_error",
                    code="shutting_down")


def internal(exc: BaseException) -> APIError:
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error", code="internal_error")
