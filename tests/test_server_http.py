"""The server's HTTP surface with raw `httpx`: malformed bodies, body limits, the API key on every route but
/health, SSE framing byte for byte, unknown routes, and the Prometheus metrics it serves."""

from __future__ import annotations

import json

import httpx
import pytest
from model_fixtures import tiny_model
from prometheus_client.parser import text_string_to_metric_families

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.engine.metrics_collector import AdvancedMetricsCollector
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.metrics import ServerMetrics
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

MODEL = tiny_model().model_id
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0, "max_tokens": 6}


@pytest.fixture
def served(request):
    """(engine, httpx client on the server); parametrize it indirectly with a dict of ServerConfig fields."""
    config = ServerConfig(**getattr(request, "param", {}))
    engine = UltraAdaptiveKVCacheEngine(
        KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=8, max_memory=2 * 1024**2), model=tiny_model())
    with BackgroundServer(create_app(engine, config, tiny_model())) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        yield engine, client
    engine.close()


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(("content", "fragment"), [
    (b"{bad json", "the request body is not valid JSON: Expecting property name"),
    (b"", "the request body is empty; expected a JSON object"),
    (b"[1, 2]", "the request body must be a JSON object, got a JSON list"),
    (b"\xff\xfe{}", "the request body is not UTF-8 JSON"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model=None is invalid"),
])
def test_malformed_bodies_are_400(served, content, fragment):
    _, client = served
    error = error_of(client.post("/v1/chat/completions", content=content), 400)
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("served", [{"max_body_bytes": 1000}], indirect=True)
def test_body_over_the_limit_is_413_declared_or_streamed(served):
    _, client = served
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
    error = error_of(client.post("/v1/chat/completions", json=big), 413)
    assert "request body is" in error["message"] and "the limit is 1000 bytes" in error["message"]
    assert error["code"] == "request_too_large"

    def chunked():  # no Content-Length: the limit is enforced while reading
        yield json.dumps(big).encode()

    error = error_of(client.post("/v1/chat/completions", content=chunked()), 413)
    assert "request body is larger; the limit is 1000 bytes" in error["message"]
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200  # still serving


@pytest.mark.parametrize("served", [{"api_key": "k-123"}], indirect=True)
def test_api_key_guards_every_route_but_health(served):
    _, client = served
    assert client.get("/health").json()["status"] == "ok"
    for method, path in [("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/chat/completions"),
                         ("POST", "/v1/completions"), ("GET", "/nowhere")]:
        error = error_of(client.request(method, path, json=CHAT), 401)
        assert error["message"].startswith("missing API key") and error["code"] == "invalid_api_key"
    for header in ("Bearer k-1234", "Basic k-123", "k-123"):
        response = client.get("/v1/models", headers={"Authorization": header})
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
    ok = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k-123"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 6


def test_unknown_routes_and_methods_get_openai_errors(served):
    _, client = served
    assert "No route GET /v1/engines" in error_of(client.get("/v1/engines"), 404)["message"]
    assert "Method GET is not allowed on /v1/completions" in error_of(client.get("/v1/completions"), 405)["message"]


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an event stream, checking the framing: every event is one `data: ` line and a
    blank line."""
    assert raw.endswith(b"\n\n")
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)
    return [e[len(b"data: "):] for e in events]


def test_sse_framing_of_a_streamed_chat(served):
    _, client = served
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        raw = response.read()
    events = sse_events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    assert set(chunks[-1]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                        "prompt_tokens_details"}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1


def test_errors_before_the_first_token_keep_their_status_when_streaming(served):
    _, client = served
    request = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "x" * 600}]}
    error = error_of(client.post("/v1/chat/completions", json=request), 400)
    assert "exceeds the model's context of 512 tokens" in error["message"]


def metric_values(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_requests_tokens_and_errors(served):
    engine, client = served
    usages = [client.post("/v1/chat/completions", json=CHAT).json()["usage"] for _ in range(2)]
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "abc", "max_tokens": 3,
                                                        "stream": True}) as response:
        response.read()
    client.post("/v1/completions", json={"model": "nope", "prompt": "abc"})
    client.post("/v1/completions", content=b"{")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = metric_values(response.text)
    assert values[("uakv:request_success_total", (("finished_reason", "length"),))] == 3
    assert values[("uakv:request_errors_total", (("status", "404"),))] == 1
    assert values[("uakv:request_errors_total", (("status", "400"),))] == 1
    assert values[("uakv:prompt_tokens_total", ())] == sum(u["prompt_tokens"] for u in usages) + 3
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert values[("uakv:prompt_tokens_cached_total", ())] == cached > 0
    assert values[("uakv:generation_tokens_total", ())] == 6 + 6 + 3
    assert values[("uakv:request_time_to_first_token_seconds_count", ())] == 3
    assert values[("uakv:e2e_request_latency_seconds_count", ())] == 3
    assert values[("uakv:inter_token_latency_seconds_count", ())] >= 1
    assert values[("uakv:num_requests_running", ())] == values[("uakv:num_requests_waiting", ())] == 0


def test_engine_collector_exposition_follows_the_server_metrics():
    collector = AdvancedMetricsCollector()
    collector.record_ttft(0.02, prompt_tokens=10, cached_tokens=8)
    metrics = ServerMetrics(engine_exposition=collector.exposition)
    metrics.record_finished("stop", prompt_tokens=10, cached_tokens=8, completion_tokens=3)
    families = [f.name for f in text_string_to_metric_families(metrics.exposition().decode())]
    assert len(families) == len(set(families))  # no name is served twice
    assert {"uakv:request_success", "uakv:time_to_first_token_seconds", "uakv:prefix_cache_hits",
            "uakv:request_time_to_first_token_seconds"} <= set(families)
    alone = ServerMetrics(engine_exposition=lambda: None)  # an engine without a collector
    alone.record_finished("stop", prompt_tokens=10, cached_tokens=8, completion_tokens=3)
    assert {f.name for f in text_string_to_metric_families(alone.exposition().decode())} == set(families) - {
        f.name for f in text_string_to_metric_families(collector.exposition().decode())}


def test_health_reports_the_model_and_nothing_in_flight(served):
    _, client = served
    assert client.get("/health").json() == {"status": "ok", "model": MODEL, "in_flight": 0}
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
