"""The engine's request front: actions, bad requests, profiling, concurrency with exact counts."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from ultra_adaptive_kv_cache_engine import CacheStrategy, KVCacheConfig, UltraAdaptiveKVCacheEngine


@pytest.fixture
def engine() -> UltraAdaptiveKVCacheEngine:
    return UltraAdaptiveKVCacheEngine(
        KVCacheConfig(max_tokens=4096, cache_strategy=CacheStrategy.LRU, enable_profiling=True)
    )


@pytest.mark.asyncio
async def test_store_then_retrieve_through_requests(engine):
    key, value = torch.randn(1, 8, 64), torch.randn(1, 8, 64)
    assert await engine.process_request({"action": "store", "key": key, "value": value}) == {
        "action": "store", "stored": True}
    out = await engine.process_request({"action": "retrieve", "key": key})
    assert out["cache_hit"] is True and torch.equal(out["value"], value)
    miss = await engine.process_request({"action": "retrieve", "key": torch.randn(1, 8, 64)})
    assert miss == {"action": "retrieve", "value": None, "cache_hit": False}


@pytest.mark.asyncio
async def test_gather_of_many_requests_keeps_every_entry(engine):
    keys = [torch.full((1, 8, 64), float(i)) for i in range(200)]

    async def one(i: int) -> None:
        await engine.process_request({"action": "store", "key": keys[i], "value": keys[i] + 1})

    await asyncio.gather(*(one(i) for i in range(200)))
    assert len(engine.cache) == 200 and engine.cache.num_tokens == 1600
    results = await asyncio.gather(*(engine.process_request({"action": "retrieve", "key": k}) for k in keys))
    assert all(torch.equal(r["value"], k + 1) for r, k in zip(results, keys, strict=True))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("request_", "error", "match"),
    [
        ("store", ValueError, "request must be a dict, got str"),
        ({"action": "fly"}, ValueError, "unknown action 'fly'; expected one of: process, retrieve, store"),
        ({"key": torch.ones(1)}, ValueError, "request has no 'action'"),
        ({"action": "store", "key": torch.ones(1)}, ValueError, "missing the field 'value'"),
        ({"action": "retrieve", "key": [1, 2]}, ValueError, "field 'key' must be a torch.Tensor, got list"),
        ({"action": "store", "key": torch.ones(1), "value": torch.full((1, 9000, 1), 1.0)}, ValueError,
         "larger than the whole capacity"),
    ],
)
async def test_bad_requests_are_named_and_cache_intact(engine, request_, error, match):
    key = torch.randn(1, 8, 64)
    engine.store(key, key)
    with pytest.raises(error, match=match):
        await engine.process_request(request_)
    assert len(engine.cache) == 1 and torch.equal(engine.retrieve(key), key)


@pytest.mark.asyncio
async def test_profiling_counts_each_operation(engine):
    for _ in range(5):
        engine.store(torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    await engine.process_request({"action": "retrieve", "key": torch.randn(1, 2, 4)})
    ops = engine.get_profiling_data()["operations"]
    assert ops["store"]["count"] == 5 and ops["retrieve"]["count"] == 1 and ops["request.retrieve"]["count"] == 1
    assert set(ops["store"]) == {"count", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"}
    assert ops["store"]["p50_ms"] <= ops["store"]["p99_ms"] <= ops["store"]["max_ms"]


def test_profiling_off_says_how_to_turn_it_on():
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(cache_strategy="lru"))
    with pytest.raises(RuntimeError, match="enable_profiling=True"):
        engine.get_profiling_data()


def test_logger_name(caplog):
    logger = logging.getLogger("ultra_adaptive_kv_cache_engine")
    with caplog.at_level(logging.DEBUG, logger="ultra_adaptive_kv_cache_engine"):
        UltraAdaptiveKVCacheEngine(KVCacheConfig(cache_strategy="lru"))
    assert any(r.name == logger.name and "engine ready" in r.getMessage() for r in caplog.records)


def test_store_and_retrieve_refuse_unknown_fields():
    import asyncio

    import torch

    from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
    from ultra_adaptive_kv_cache_engine.engine.requests import RequestError

    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=64))
    key = torch.ones(2)
    with pytest.raises(RequestError, match=r"unknown field\(s\) \['ttl'\] in a 'store' request"):
        asyncio.run(engine.process_request({"action": "store", "key": key, "value": key, "ttl": 5}))
    with pytest.raises(RequestError, match=r"unknown field\(s\) \['keys'\] in a 'retrieve' request"):
        asyncio.run(engine.process_request({"action": "retrieve", "key": key, "keys": [key]}))
    assert len(engine.cache) == 0  # nothing stored by the refused request
