"""Reading a request's JSON body within `max_body_bytes`: a declared Content-Length over the limit is refused
before reading, a body that grows past it while streaming in is refused at the byte that crosses it (413);
a body that is not JSON is a 400 naming the parser's complaint."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from .errors import bad_request, body_too_large


async def read_json(request: Request, limit: int) -> Any:
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"Content-Length={declared!r} is invalid; expected a number of bytes")
        if int(declared) > limit:
            raise body_too_large(int(declared), limit)
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise body_too_large(None, limit)
    if not body:
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")  # JSON on the wire is UTF-8 (RFC 8259); no guessing of other encodings
    except UnicodeDecodeError as exc:
        raise bad_request(f"the request body is not UTF-8 JSON: {exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
