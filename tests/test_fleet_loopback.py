"""A real loopback fleet on SmolLM2 (slow): a three-master Redis Cluster created here, three servers sharing
it (two in-thread apps, whose pools the test inspects, and one `uakv serve` process), `uakv route` in front.

- a prefix computed behind one server is a hit behind another (through the cluster) and gives the same
  greedy answer;
- conversations through the router while one Redis master and the `uakv serve` process are killed (SIGKILL)
  mid-run: every request succeeds (the router retries elsewhere, lost blocks are recomputed);
- shadow verification at 100% on every server: zero mismatches (no response was served from a wrong block);
- at idle the survivors' pools balance: no sequence left, every block free (cached or not).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis
from model_fixtures import smollm_model
from redis_server import start_cluster

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

pytestmark = pytest.mark.slow
SRC = Path(__file__).resolve().parents[1] / "src"
SECRET = "fleet-loopback-secret-0123456789"
POOL_BYTES = 256 * 1024**2
SYSTEM = ("You are a concise assistant for engineers who run language models in production. You explain how a "
          "key-value cache stores the attention keys and values of a prompt prefix so that later requests with "
          "the same prefix skip its prefill, how blocks are named by hashes, and how a fleet of servers shares "
          "blocks through Redis. Answer in one short sentence.")


def fleet_config(redis_url: str) -> dict[str, object]:
    return {"device": "cpu", "redis_url": redis_url, "tier_secret": SECRET, "shadow_fraction": 1.0,
            "cpu_tier_bytes": 0, "max_memory": POOL_BYTES, "max_new_tokens": 8}


def start_uakv_serve(config: dict[str, object], log: Path) -> tuple[subprocess.Popen, str]:
    args = [sys.executable, "-m", "ultra_adaptive_kv_cache_engine", "serve", "--port", "0"]
    for name, value in config.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300  # a bound against a hang (the model loads in this time)
    while time.monotonic() < deadline:
        found = re.search(r"uakv serve: \S+ on (http://\S+)", log.read_text())
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return process, found.group(1)
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            raise AssertionError(f"uakv serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"uakv serve did not start:\n{log.read_text()}")


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client: openai.OpenAI, messages: list[dict]) -> tuple[str, int]:
    answer = client.chat.completions.create(model=smollm_model().model_id, messages=messages, max_tokens=8,
                                            temperature=0)
    return answer.choices[0].message.content, answer.usage.prompt_tokens_details.cached_tokens


def redis_keys(ports: list[int]) -> int:
    total = 0
    for port in ports:
        with redis.Redis(host="127.0.0.1", port=port) as r:
            total += r.dbsize()
    return total


def wait_for_write_through(ports: list[int]) -> None:
    """Until the cluster's key count is non-zero and stops growing (the writer threads are done)."""
    last, deadline = -1, time.monotonic() + 60
    while time.monotonic() < deadline:
        now = redis_keys(ports)
        if now and now == last:
            return
        last = now
        time.sleep(0.5)


def wait_idle(engine: UltraAdaptiveKVCacheEngine) -> dict:
    deadline = time.monotonic() + 300
    while True:
        stats = engine.get_stats()["model"]
        if stats["shadow"]["pending"] == 0 and stats["sequences"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)


def test_fleet_shares_prefixes_and_survives_losing_a_server_and_a_redis_master(tmp_path):
    nodes = start_cluster(tmp_path / "redis", 3)
    ports = [n.port for n in nodes]
    config = fleet_config(f"redis://127.0.0.1:{ports[0]}/0?cluster=true")
    process, remote = start_uakv_serve(config, tmp_path / "serve.log")
    engines = [UltraAdaptiveKVCacheEngine(KVCacheConfig(**config), model=smollm_model()) for _ in range(2)]
    servers = [BackgroundServer(create_app(e, ServerConfig(port=0), smollm_model())) for e in engines]
    try:
        for s in servers:
            s.__enter__()
        local = [s.url for s in servers]

        # 1. A prefix computed behind one server is a hit behind another, with the same greedy answer.
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does a block hold?"}]
        computed, cached = chat(client_of(local[0]), first)
        assert cached == 0
        wait_for_write_through(ports)
        again, cached = chat(client_of(remote), first)
        assert cached > 0 and again == computed

        # 2. Conversations through the router; a Redis master and the uakv serve process die mid-run.
        router_config = RouterConfig(instances=(*local, remote), port=0, health_interval_s=0.5)
        with BackgroundServer(create_router_app(router_config)) as router, ThreadPoolExecutor(3) as pool:
            client = client_of(router.url)
            talks = [[{"role": "system", "content": f"Conversation {i}. {SYSTEM}"},
                      {"role": "user", "content": f"Question {i}: why reuse a prefix?"}] for i in range(6)]
            for turn in range(3):
                pending = [pool.submit(chat, client, talk) for talk in talks]
                if turn == 1:
                    time.sleep(0.2)  # the turn's requests are in flight
                    nodes[2].stop()
                    process.send_signal(signal.SIGKILL)
                answers = [p.result() for p in pending]  # every request succeeds (none raises)
                for talk, (text, _) in zip(talks, answers, strict=True):
                    talk += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
            health = httpx.get(f"{router.url}/health").json()
            assert {i["url"]: i["healthy"] for i in health["instances"]}[remote] is False

        # 3. No wrong block was served anywhere; the survivors' pools balance at idle.
        for engine in engines:
            stats = wait_idle(engine)
            assert stats["shadow"]["checks"] > 0 and stats["shadow"]["mismatches"] == 0, stats["shadow"]
            assert stats["sequences"] == 0 and stats["free_blocks"] == stats["num_blocks"], stats
    finally:
        for s in servers:
            if s.thread.is_alive():
                s.stop()
        for e in engines:
            e.close()
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        for n in nodes:
            n.stop()
