"""`create_app(engine, config)`: the OpenAI-compatible ASGI app over one engine.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (whole or streamed), `GET /v1/models`,
`GET /v1/models/{id}`, `GET /health` (never behind the API key), `GET /metrics` (Prometheus text: the
server's metrics, then the engine collector's), `GET /v1/cache/digest` (the block hashes it holds, for
routers: cache_digest.py). Every error is an OpenAI error object (errors.py), counted in
`uakv:request_errors_total`; the app keeps serving after any of them. The app does not own the engine:
whoever built the engine closes it (run.py does, after draining).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..model.loaded import LoadedModel
from .admission import Admission
from .auth import ApiKeyMiddleware
from .body import read_json
from .cache_digest import CacheDigest, digest_endpoint
from .config import ServerConfig
from .errors import APIError, internal, method_not_allowed, model_not_found, route_not_found
from .metrics import ServerMetrics
from .protocol import parse_chat, parse_completion
from .responses import CHAT, COMPLETION
from .service import CompletionService, PromptLimit

if TYPE_CHECKING:
    from ..engine.engine import UltraAdaptiveKVCacheEngine


def engine_exposition(engine: UltraAdaptiveKVCacheEngine) -> bytes | None:
    """The engine collector's Prometheus text, when the engine exposes a collector as `engine.metrics`."""
    exposition = getattr(getattr(engine, "metrics", None), "exposition", None)
    return exposition() if callable(exposition) else None


def served_model_name(engine: UltraAdaptiveKVCacheEngine, config: ServerConfig) -> str:
    """The configured name, else the engine's model id. Asking the engine opens its model session (loads the
    model), so the first request does not pay for it on the event loop."""
    described = engine.describe()
    return config.model_name if config.model_name is not None else str(described["model"]["id"])


def _error_response(error: APIError, metrics: ServerMetrics) -> JSONResponse:
    metrics.record_error(error.status)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(engine: UltraAdaptiveKVCacheEngine, config: ServerConfig, model: LoadedModel | None = None) -> FastAPI:
    """The app serving `engine`, whose model is loaded now. `model` (the LoadedModel the engine was built with)
    is needed only for `config.max_prompt_tokens` (its tokenizer counts prompts before they reach the engine)."""
    if not isinstance(config, ServerConfig):
        raise TypeError(f"config must be a ServerConfig, got {type(config).__name__}")
    if config.max_prompt_tokens is not None and model is None:
        raise ValueError(f"ServerConfig.max_prompt_tokens={config.max_prompt_tokens} needs the model's tokenizer; "
                         "pass the LoadedModel: create_app(engine, config, model=...)")
    name = served_model_name(engine, config)
    metrics = ServerMetrics(engine_exposition=lambda: engine_exposition(engine))
    admission = Admission(config.max_queue, config.retry_after_s, metrics)
    limit = (PromptLimit(model.tokenizer, config.max_prompt_tokens)
             if model is not None and config.max_prompt_tokens is not None else None)
    service = CompletionService(engine, config, name, admission, limit)
    created = int(time.time())

    app = FastAPI(title="uakv", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.admission, app.state.metrics = service, admission, metrics

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc, metrics)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return _error_response(method_not_allowed(request.method, request.url.path), metrics)
        if exc.status_code == 404:
            return _error_response(route_not_found(request.method, request.url.path), metrics)
        return _error_response(APIError(exc.status_code, str(exc.detail)), metrics)

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(internal(exc), metrics)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "uakv"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name, "in_flight": admission.in_flight}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise model_not_found(model_id, name)
        return model_card()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    digest = CacheDigest.of(engine.cache_manager(), name)
    app.add_api_route("/v1/cache/digest", digest_endpoint(digest), methods=["GET"])

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, config.max_body_bytes)
        return await service.complete(parse_chat(body, config.max_tokens_limit), CHAT)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read_json(request, config.max_body_bytes)
        return await service.complete(parse_completion(body, config.max_tokens_limit), COMPLETION)

    if config.api_key is not None:
        app.add_middleware(ApiKeyMiddleware, api_key=config.api_key, metrics=metrics)
    return app
