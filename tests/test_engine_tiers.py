"""The engine over its tiers, end to end on a tiny random Llama: persistence across engines, a prefix
shared by two processes through one real Redis, tenant isolation, and Redis dying mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from redis_server import RedisServer, redis_or_skip

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama

PROMPT = {"text": "A shared system prompt that is long enough to fill several blocks.", "max_new_tokens": 4}
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama()


def run(engine, request):
    return asyncio.run(engine.process_request(request))


def tier_counters(engine, kind: str) -> dict[str, int]:
    tiers = engine.get_stats()["model"]["tiers"]["children"]
    return next(t["counters"] for t in tiers if t["name"] == kind)


def test_persist_then_a_new_engine_loads_and_hits(tmp_path, tiny):
    config = KVCacheConfig(max_tokens=1024, block_size=4, enable_persistence=True, persistence_path=str(tmp_path))
    engine = UltraAdaptiveKVCacheEngine(config, model=tiny)
    first = run(engine, PROMPT)
    written = engine.persist()
    full_blocks = (first["prompt_tokens"] + first["completion_tokens"] - 1) // 4  # the last token has no KV
    assert first["cache_hit"] is False
    assert written["kv_blocks"] == full_blocks and written["kv_bytes"] > 0
    engine.close()
    fresh = UltraAdaptiveKVCacheEngine(config, model=tiny)
    loaded = fresh.load()
    assert loaded["kv_blocks_on_disk"] == written["kv_blocks"]
    again = run(fresh, PROMPT)
    assert again["cache_hit"] is True and again["text"] == first["text"]
    assert again["cached_tokens"] == min((first["prompt_tokens"] // 4) * 4, first["prompt_tokens"] - 1)
    assert tier_counters(fresh, "disk")["hits"] >= 1


def test_persist_and_load_need_persistence_on(tiny):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(cache_strategy="lru"), model=tiny)
    with pytest.raises(RuntimeError, match="enable_persistence=True"):
        engine.persist()
    with pytest.raises(RuntimeError, match="enable_persistence=True"):
        engine.load()


def test_tensor_store_survives_a_restart_and_a_bad_snapshot_is_refused(tmp_path, tiny):
    import torch

    config = KVCacheConfig(max_tokens=64, cache_strategy="lru", enable_persistence=True, persistence_path=str(tmp_path))
    engine = UltraAdaptiveKVCacheEngine(config, model=tiny)
    key, value = torch.randn(1, 8, 4), torch.randn(1, 8, 4)
    engine.store(key, value)
    assert engine.persist()["tensor_entries"] == 1
    fresh = UltraAdaptiveKVCacheEngine(config, model=tiny)
    assert fresh.load()["tensor_entries"] == 1 and torch.equal(fresh.retrieve(key), value)
    snapshot = next(tmp_path.glob("tensor-store-*.safetensors"))
    data = bytearray(snapshot.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in the last tensor's payload
    snapshot.write_bytes(bytes(data))
    other = UltraAdaptiveKVCacheEngine(config, model=tiny)
    other.store(key, value * 2)  # already cached: must survive the refused load
    assert other.load() == {"tensor_entries": 0, "snapshots_rejected": 1, "kv_blocks_on_disk": 0}
    assert torch.equal(other.retrieve(key), value * 2)


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
    from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama
    config = KVCacheConfig(max_tokens=1024, block_size=4, redis_url=sys.argv[1], tenant_salt=sys.argv[2])
    with UltraAdaptiveKVCacheEngine(config, model=build_tiny_llama()) as engine:
        out = asyncio.run(engine.process_request(json.loads(sys.argv[3])))
    print(json.dumps(out))
    """
)


def run_child(url: str, tenant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHILD, url, tenant, json.dumps(PROMPT)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def redis(tmp_path):
    redis_or_skip()
    server = RedisServer.start(tmp_path / "redis")
    yield server
    server.stop()


def test_two_processes_share_a_prefix_through_redis_and_tenants_stay_apart(redis, tiny):
    first = run_child(redis.url, "tenant-a")
    assert first["cache_hit"] is False
    config = KVCacheConfig(max_tokens=1024, block_size=4, redis_url=redis.url, tenant_salt="tenant-a")
    with UltraAdaptiveKVCacheEngine(config, model=tiny) as engine:
        second = run(engine, PROMPT)
        assert second["cache_hit"] is True and second["text"] == first["text"]
        assert tier_counters(engine, "redis")["hits"] >= 1
    other = KVCacheConfig(max_tokens=1024, block_size=4, redis_url=redis.url, tenant_salt="tenant-b")
    with UltraAdaptiveKVCacheEngine(other, model=tiny) as engine:
        isolated = run(engine, PROMPT)
        assert isolated["cache_hit"] is False and isolated["text"] == first["text"]


def test_redis_dying_mid_run_keeps_the_engine_serving(redis, tiny):
    config = KVCacheConfig(max_tokens=1024, block_size=4, redis_url=redis.url, cpu_tier_bytes=0)
    with UltraAdaptiveKVCacheEngine(config, model=tiny) as engine:
        first = run(engine, PROMPT)
        redis.stop()
        again = run(engine, PROMPT)  # still in the pool
        other = run(engine, {**PROMPT, "text": "a different prompt while redis is down", "raw": True})
        assert again["cache_hit"] is True and again["text"] == first["text"]
        assert other["cache_hit"] is False and other["completion_tokens"] == 4
        redis.restart()  # empty: the server keeps no data across restarts
        time.sleep(1.2)  # the tier retries a dead server at most once a second
        after = run(engine, {**PROMPT, "text": "yet another prompt once redis is back", "raw": True})
        assert after["completion_tokens"] == 4
    import redis as redis_py

    assert redis_py.Redis.from_url(redis.url).dbsize() > 0  # blocks written after the reconnection


def test_compute_or_load_follows_the_measured_costs(tmp_path, tiny):
    config = KVCacheConfig(max_tokens=1024, block_size=4, enable_persistence=True, persistence_path=str(tmp_path))
    with UltraAdaptiveKVCacheEngine(config, model=tiny) as writer:
        first = run(writer, PROMPT)
        writer.persist()
    # A disk that moves one byte per second: recomputing is cheaper, so nothing is loaded.
    slow = UltraAdaptiveKVCacheEngine(config, model=tiny)
    slow.optimizer.bandwidth.set_prior("disk", 1.0)
    slow.optimizer.observe_prefill(0, 64, 0.01)
    recomputed = run(slow, PROMPT)
    assert recomputed["cached_tokens"] == 0 and recomputed["text"] == first["text"]
    assert tier_counters(slow, "disk")["hits"] == 0 and slow.get_stats()["model"]["tier_hit_tokens"] == 0
    # A disk far faster than the prefill: every cached block is loaded.
    fast = UltraAdaptiveKVCacheEngine(config, model=tiny)
    fast.optimizer.bandwidth.set_prior("disk", 1e12)
    fast.optimizer.observe_prefill(0, 64, 10.0)
    loaded = run(fast, PROMPT)
    assert loaded["cached_tokens"] == min((first["prompt_tokens"] // 4) * 4, first["prompt_tokens"] - 1)
    assert loaded["text"] == first["text"] and tier_counters(fast, "disk")["hits"] >= 1
    assert fast.optimizer.bandwidth.observations.get("disk", 0) == 1  # the load was measured
    slow.close()
    fast.close()


def test_advanced_optimization_on_the_engine(tiny):
    import torch

    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(cache_strategy="lru"), model=tiny)
    entries = [torch.randn(1, 8, 64) for _ in range(10)]
    result = engine.advanced_optimization(entries, "memory")
    assert result["optimized_count"] == 10 and result["improvement_percentage"] > 0
    assert set(result) == {"optimized_count", "improvement_percentage", "metrics", "entries"}
    with pytest.raises(ValueError, match="latency"):
        engine.advanced_optimization(entries, "speed")
