"""Many clients at once and clients that go away: every stream completes, a disconnected client's generation is
cancelled, and the block pool is whole again at idle (free_blocks == num_blocks)."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from model_fixtures import smollm_model, tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

SYSTEM = "You are a helpful assistant. Keep every answer short and to the point."


def serve(model, block_size: int = 4, max_memory: int = 2 * 1024**2, **server_fields):
    engine = UltraAdaptiveKVCacheEngine(
        KVCacheConfig(max_tokens=4096, block_size=block_size, max_new_tokens=8, max_memory=max_memory), model=model)
    return engine, BackgroundServer(create_app(engine, ServerConfig(**server_fields), model))


def wait_until(condition, what: str, limit_s: float = 60.0) -> None:
    """Polls `condition` (a bound against a hang, not a timing assertion)."""
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {what} after {limit_s} s")
        time.sleep(0.02)


def assert_idle(engine, app) -> None:
    stats = engine.get_stats()["model"]
    assert stats["free_blocks"] == stats["num_blocks"] and stats["sequences"] == 0
    assert app.state.admission.in_flight == 0
    sample = app.state.metrics.registry.get_sample_value
    assert sample("uakv:num_requests_running") == sample("uakv:num_requests_waiting") == 0


async def stream_all(url: str, model: str, clients: int, max_tokens: int) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion_tokens) of `clients` concurrent streamed chats sharing a system prompt."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600) as client:
        async def one(i: int) -> tuple[str, str, int]:
            stream = await client.chat.completions.create(
                model=model, temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
                messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}])
            text, reason, tokens = "", "", 0
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    reason = chunk.choices[0].finish_reason or reason
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            return text, reason, tokens

        return await asyncio.gather(*(one(i) for i in range(clients)))


def test_fifty_concurrent_streams_all_complete_and_the_pool_balances():
    engine, server = serve(tiny_model())
    with server:
        app = server.server.config.app
        results = asyncio.run(stream_all(server.url, tiny_model().model_id, clients=50, max_tokens=6))
        assert len(results) == 50 and all(reason in ("stop", "length") for _, reason, _ in results)
        assert all(tokens == 6 for _, reason, tokens in results if reason == "length")
        # each client got the same text as the same request alone (greedy): no crosstalk between streams
        with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as client:
            for i in (0, 17, 49):
                alone = client.chat.completions.create(
                    model=tiny_model().model_id, temperature=0, max_tokens=6,
                    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Question {i}?"}])
                assert results[i][0] == alone.choices[0].message.content
        assert_idle(engine, app)
        assert engine.get_stats()["model"]["cached_tokens"] > 0  # the shared system prompt was reused
    engine.close()


def test_a_client_that_disconnects_mid_stream_cancels_and_frees_its_blocks():
    engine, server = serve(tiny_model())
    prompt = {"model": tiny_model().model_id, "prompt": "A long story:", "temperature": 0, "max_tokens": 400}
    with server, httpx.Client(base_url=server.url, timeout=120) as client:
        app = server.server.config.app
        whole = client.post("/v1/completions", json=prompt).json()
        assert whole["choices"][0]["finish_reason"] == "length"  # this prompt runs the full 400 tokens
        with client.stream("POST", "/v1/completions", json={**prompt, "stream": True}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert '"finish_reason": null' in first
        # leaving the block closed the connection mid-stream
        sample = app.state.metrics.registry.get_sample_value
        wait_until(lambda: app.state.admission.in_flight == 0, "idle")
        assert sample("uakv:request_success_total", {"finished_reason": "cancelled"}) == 1
        assert sample("uakv:generation_tokens_total") < 800  # the cancelled one stopped early
        assert_idle(engine, app)
        assert client.post("/v1/completions", json={**prompt, "max_tokens": 5}).json()["usage"]["completion_tokens"] == 5
    engine.close()


@pytest.mark.slow
def test_two_hundred_concurrent_streams_on_smollm2():
    model = smollm_model()
    engine, server = serve(model, block_size=16, max_memory=64 * 1024**2)
    with server:
        results = asyncio.run(stream_all(server.url, model.model_id, clients=200, max_tokens=4))
        assert len(results) == 200 and all(reason in ("stop", "length") and text for text, reason, _ in results)
        assert_idle(engine, server.server.config.app)
        assert engine.get_stats()["model"]["cached_tokens"] > 0
    engine.close()
