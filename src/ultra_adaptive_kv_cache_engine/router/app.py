"""`create_router_app(config)`: the ASGI proxy in front of N `uakv serve` instances, speaking their OpenAI API.

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (routed; bodies and answers passed through as
they are, server-sent events streamed chunk by chunk), `GET /v1/models[/{id}]` (any healthy instance),
`GET /health` (the router and each instance), `GET /metrics` (router/metrics.py). Every answer the router
itself gives is an OpenAI error object (413, 503: no healthy instance, 504: an instance timed out).

How it routes (router/instances.py): the routing policy (`RouterConfig.policy`, `policies.fleet.routing`) picks
among the healthy instances from the share of the prompt each holds and their load. What an instance holds is
what it reports (`prefix_source=digest`, the default): its `GET /v1/cache/digest` (server/cache_digest.py),
polled every `digest_interval_s` and after each answer from it (router/digest_poller.py), matched against the
prompt's block hashes, which the router computes as the instances do (router/tokens.py: the same parsers,
tokenizer and chat template; router/digests.py: the same chained hashes under the instance's namespace). So it
sees evictions, restarts and prefixes an instance got from the shared Redis tier or from clients that bypass
this router. An instance that offers no digest (or under another tokenizer), a prompt that cannot be
tokenized, or `prefix_source=text`: the text chunks the router sent there (router/prefixes.py). Each routed
request counts its source in `uakv_router:prefix_source_total{source}`. Tokenizing runs on one worker thread
(a Hugging Face tokenizer is not thread-safe), never on the event loop.
A request whose instance cannot be reached (connection refused, reset before the answer) goes to the next
choice, and that instance takes nothing until its health check passes again; the answer carries
`x-uakv-instance` (the instance's URL).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..metrics import LOGGER_NAME
from ..policies.fleet.routing import make_routing_policy
from ..server.errors import APIError
from .config import RouterConfig
from .digest_poller import DigestPoller
from .digests import PromptBlocks
from .instances import Fleet, Instance, Prompt
from .metrics import RouterMetrics
from .prefixes import chunk_digests, prompt_text
from .tokens import PromptTokenizer

logger = logging.getLogger(LOGGER_NAME)
FORWARDED = ("authorization", "content-type", "accept", "x-request-id")
NOT_PASSED_BACK = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date",
                   "server"}
INSTANCE_HEADER = "x-uakv-instance"


class Router:
    """The fleet, its metrics and the HTTP client to the instances (opened by `start`, closed by `stop`).
    `tokenizer`: the instances' (None: every instance is routed by text chunks)."""

    def __init__(self, config: RouterConfig, tokenizer: PromptTokenizer | None = None) -> None:
        if not config.instances:
            raise ValueError("RouterConfig.instances is empty: name at least one `uakv serve` URL")
        self.config = config
        self.fleet = Fleet.of(config.instances, make_routing_policy(config.policy, **config.policy_options),
                              config.index_chunks)
        self.metrics = RouterMetrics(self.fleet)
        self.tokenizer = tokenizer if config.prefix_source == "digest" else None
        self.poller = DigestPoller(self.fleet.instances, config.digest_interval_s, config.api_key,
                                   config.connect_timeout_s + 10 * config.digest_interval_s, self.metrics,
                                   self.tokenizer.identity if self.tokenizer is not None else "")
        self.client: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        self._tokens: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        c = self.config
        timeout = httpx.Timeout(c.request_timeout_s, connect=c.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        self.client = httpx.AsyncClient(timeout=timeout, limits=limits)
        self._health = asyncio.create_task(self._health_loop())
        if self.tokenizer is not None and self.fleet.policy.uses_cache:
            self._tokens = ThreadPoolExecutor(1, thread_name_prefix="uakv-router-tokens")
            self.poller.start(self.client)

    async def stop(self) -> None:
        await self.poller.stop()
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        if self._tokens is not None:
            self._tokens.shutdown(wait=True, cancel_futures=True)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._check(i) for i in self.fleet.instances))
            await asyncio.sleep(self.config.health_interval_s)

    async def _check(self, instance: Instance) -> None:
        assert self.client is not None
        try:
            answer = await self.client.get(f"{instance.url}/health", timeout=self.config.connect_timeout_s)
            body = answer.json() if answer.status_code == 200 else {}
            instance.mark_health(answer.status_code == 200, int(body.get("in_flight", 0)))
        except (httpx.HTTPError, ValueError, TypeError):
            instance.mark_health(False)

    # ------------------------------------------------------------------ proxying
    async def route(self, request: Request) -> Response:
        """Sends the request to the policy's choice, then to the next healthy one while instances fail."""
        arrived = time.perf_counter()
        body = await _read_body(request, self.config.max_body_bytes)
        try:
            parsed: Any = json.loads(body)
        except ValueError:
            parsed = None  # the instance answers the OpenAI 400
        prompt = await self._prompt(request.url.path, parsed)
        stream = isinstance(parsed, dict) and parsed.get("stream") is True
        tried: set[str] = set()
        while (choice := self.fleet.choose(prompt, tried)) is not None:
            instance = choice.instance
            tried.add(instance.url)
            self.metrics.requests.labels(instance=instance.url).inc()
            self.metrics.routing.observe(time.perf_counter() - arrived)
            answer = await self._send(instance, request, body, stream)
            if answer is None:
                self.metrics.retries.inc()
                continue
            self.metrics.record_match(choice.match)
            if answer.status_code == 200:
                self._remember(instance, prompt)
            return answer
        self.metrics.no_instance.inc()
        raise APIError(503, f"no healthy instance to serve the request (tried {sorted(tried) or 'none'})",
                       type="server_error", code="no_instance", headers={"Retry-After": "1"})

    async def _prompt(self, path: str, parsed: Any) -> Prompt:
        """The request's text chunks, and its blocks when some instance has a digest to match them against."""
        chunks = chunk_digests(prompt_text(parsed), self.config.chunk_chars)
        if self._tokens is None or self.tokenizer is None or not any(i.digest.ready for i in self.fleet.instances):
            return Prompt(chunks)
        ids = await asyncio.get_running_loop().run_in_executor(self._tokens, self.tokenizer.token_ids, path, parsed)
        return Prompt(chunks) if ids is None else Prompt(chunks, PromptBlocks(ids), self.tokenizer.identity)

    @staticmethod
    def _remember(instance: Instance, prompt: Prompt) -> None:
        """The instance answered the prompt: it holds its prefix now (until its next digest says otherwise)."""
        instance.prefixes.add(prompt.chunks)
        digest = instance.digest
        if prompt.blocks is not None and digest.ready and digest.tokenizer == prompt.tokenizer:
            digest.predict(prompt.blocks.hashes(digest.key), time.monotonic())

    async def _send(self, instance: Instance, request: Request, body: bytes, stream: bool) -> Response | None:
        """The instance's answer, or None when it could not be reached (then it is marked down)."""
        assert self.client is not None
        headers = {k: request.headers[k] for k in FORWARDED if k in request.headers}
        upstream = self.client.build_request(request.method, instance.url + request.url.path, content=body,
                                             headers=headers)
        instance.in_flight += 1
        instance.routed += 1
        try:
            answer = await self.client.send(upstream, stream=True)
            if stream and answer.status_code == 200:
                relay = _relay(answer, instance, lambda: self.poller.wake(instance))
                return StreamingResponse(relay, status_code=200, headers=_headers(answer, instance))
            content = await answer.aread()
            await answer.aclose()
            self.poller.wake(instance)
        except httpx.TimeoutException as exc:
            instance.in_flight -= 1
            if isinstance(exc, httpx.ConnectTimeout):
                return self._failed(instance, exc)
            self.metrics.upstream_errors.labels(instance=instance.url).inc()
            raise APIError(504, f"instance {instance.url} did not answer in time: {exc!r}", type="server_error",
                           code="upstream_timeout") from None
        except httpx.TransportError as exc:
            instance.in_flight -= 1
            return self._failed(instance, exc)
        instance.in_flight -= 1
        return Response(content, status_code=answer.status_code, headers=_headers(answer, instance))

    def _failed(self, instance: Instance, exc: Exception) -> None:
        logger.warning("router: instance %s failed (%r); marked down until its health check passes", instance.url, exc)
        self.metrics.upstream_errors.labels(instance=instance.url).inc()
        instance.mark_down()
        return None

    async def forward_get(self, request: Request) -> Response:
        """A GET (models) answered by the first healthy instance that answers."""
        assert self.client is not None
        for instance in [i for i in self.fleet.instances if i.healthy]:
            try:
                headers = {k: request.headers[k] for k in FORWARDED if k in request.headers}
                answer = await self.client.get(instance.url + request.url.path, headers=headers)
            except httpx.TransportError as exc:
                self._failed(instance, exc)
                continue
            return Response(answer.content, status_code=answer.status_code, headers=_headers(answer, instance))
        self.metrics.no_instance.inc()
        raise APIError(503, "no healthy instance", type="server_error", code="no_instance")

    def health(self) -> dict[str, Any]:
        instances = [{"url": i.url, "healthy": i.healthy, "in_flight": i.in_flight, "routed": i.routed,
                      "failures": i.failures, "believed_cached_chunks": len(i.prefixes),
                      "digest": {"instance": i.digest.instance, "generation": i.digest.generation,
                                 "blocks": len(i.digest.held)} if i.digest.ready else None}
                     for i in self.fleet.instances]
        ok = any(i.healthy for i in self.fleet.instances)
        return {"status": "ok" if ok else "unavailable", "policy": self.config.policy,
                "prefix_source": self.config.prefix_source if self.tokenizer is not None else "text",
                "instances": instances}


def load_tokenizer(config: RouterConfig) -> PromptTokenizer | None:
    """The tokenizer of `config.model_path`; when the default model has none here, None (a warning: the router
    routes by text chunks). A model path given that has none raises ValueError."""
    try:
        return PromptTokenizer.load(config.model_path)
    except (ValueError, OSError) as exc:
        if config.model_path is not None:
            raise
        logger.warning("router: no tokenizer for the default model (%s); routing by text chunks", exc)
        return None


async def _relay(answer: httpx.Response, instance: Instance, ended: Callable[[], None]) -> AsyncIterator[bytes]:
    """The instance's event stream, chunk by chunk as it arrives; the instance's slot is given back at the end,
    then `ended` is called."""
    try:
        async for chunk in answer.aiter_raw():
            yield chunk
    except httpx.TransportError as exc:  # the instance died mid-stream: the client sees the stream end
        logger.warning("router: stream from %s broke: %r", instance.url, exc)
    finally:
        instance.in_flight -= 1
        await answer.aclose()
        ended()


def _headers(answer: httpx.Response, instance: Instance) -> dict[str, str]:
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in NOT_PASSED_BACK}
    headers[INSTANCE_HEADER] = instance.url
    return headers


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body is larger than {limit} bytes (RouterConfig.max_body_bytes)",
                         code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_large
    return bytes(body)


def create_router_app(config: RouterConfig, tokenizer: PromptTokenizer | None = None) -> Starlette:
    """The router's ASGI app; its HTTP client, health checks and digest polls run from startup to shutdown
    (lifespan). `tokenizer`: the instances' (default with `prefix_source=digest`: `config.model_path`'s, see
    `load_tokenizer`)."""
    if tokenizer is None and config.prefix_source == "digest" and config.instances:  # none: Router refuses it
        tokenizer = load_tokenizer(config)
    router = Router(config, tokenizer)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    async def health(request: Request) -> JSONResponse:
        state = router.health()
        return JSONResponse(state, status_code=200 if state["status"] == "ok" else 503)

    async def metrics(request: Request) -> Response:
        return Response(router.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    routes = [
        Route("/v1/chat/completions", router.route, methods=["POST"]),
        Route("/v1/completions", router.route, methods=["POST"]),
        Route("/v1/models", router.forward_get, methods=["GET"]),
        Route("/v1/models/{model_id:path}", router.forward_get, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={APIError: on_api_error})
    app.state.router = router
    return app
