"""The adaptive controllers on the engine's live path: every request reaches them, each can be switched off."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama

SYSTEM = {"role": "system", "content": "You answer in riddles about paged attention and block tables."}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama()


def make(tiny, **switches) -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(block_size=4, max_new_tokens=4, max_memory=2 * 1024**2, cpu_tier_bytes=1 << 20,
                           controller_interval_s=3600.0, **switches)
    return UltraAdaptiveKVCacheEngine(config, model=tiny)


def samples(engine: UltraAdaptiveKVCacheEngine) -> dict[str, float]:
    assert engine.metrics is not None
    text = engine.metrics.exposition().decode()
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def chat(engine: UltraAdaptiveKVCacheEngine, turns: list[str]) -> list[dict]:
    messages, results = [SYSTEM], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        result = asyncio.run(engine.process_request({"messages": messages, "conversation_id": "c1"}))
        messages.append({"role": "assistant", "content": result["text"]})
        results.append(result)
    return results


def test_every_request_reaches_the_controllers_and_the_metrics(tiny):
    with make(tiny) as engine:
        results = chat(engine, ["first question", "second question"])
        controllers = engine.get_stats()["model"]["controllers"]
        assert controllers["requests"] == 2 and controllers["running"] is True  # the round thread is up
        assert controllers["prefetcher"]["live_conversations"] == 1  # the conversation id named the chat
        assert controllers["autoscaler"] is None  # off by default
        got = samples(engine)
        prompt = sum(r["prompt_tokens"] for r in results)
        cached = sum(r["cached_tokens"] for r in results)
        assert results[1]["cached_tokens"] > 0
        assert got["uakv:prefix_cache_queries_total[]"] == prompt
        assert got["uakv:prefix_cache_hits_total[]"] == cached
        assert got["uakv:block_hits_total[('tier', 'pool')]"] == cached // 4  # all from the pool here
    assert engine.get_stats()["model"]["controllers"]["running"] is False  # close stops the thread


def test_a_round_promotes_through_the_managers_tiers(tiny):
    with make(tiny, enable_autoscaler=True) as engine:
        chat(engine, ["one", "two"])
        session = engine._session
        assert session is not None
        round_ = session.controllers.step()  # what the background thread does every interval
        stats = engine.get_stats()["model"]["controllers"]
        assert stats["rounds"] == 1 and round_.scaling == ()  # fewer requests than min_requests: no resize
        assert set(stats["autoscaler"]["tiers"]) == {"cpu"}  # the manager's one resizable tier


def test_switched_off_controllers_do_nothing(tiny):
    with make(tiny, enable_prefetcher=False, enable_metrics=False) as engine:
        chat(engine, ["only turn"])
        stats = engine.get_stats()["model"]["controllers"]
        assert stats["running"] is False and stats["requests"] == 0
        assert stats["prefetcher"] is None and stats["metrics"] is None and engine.metrics is None
