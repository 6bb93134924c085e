"""A real loopback fleet on SmolLM2 (slow): a three-master Redis Cluster created here, three `uakv serve`
processes sharing it (free loopback ports, started and stopped by their pids), the router in front (digest
routing, the SmolLM2 tokenizer).

- a prefix computed behind one server is a hit behind another (through the cluster) and gives the same
  greedy answer; the router, which routed neither request, sends the conversation's next turn to one of those
  two (it reads their cache digests);
- conversations through the router while one Redis master and one server are killed (SIGKILL) mid-run: every
  request succeeds (the router retries elsewhere, lost blocks are recomputed);
- shadow verification at 100% on every server: zero mismatches (no response was served from a wrong block):
  the counters at idle, and no mismatch logged by the checks still queued, which a graceful stop finishes;
- at idle the survivors' pools balance (their cache digests' pool occupancy): no sequence left, every block
  free (cached or not).
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
from redis_server import start_cluster

from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
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


def launch_uakv_serve(config: dict[str, object], log: Path) -> subprocess.Popen:
    """A `uakv serve` process on a free loopback port (port 0: it prints the URL it bound)."""
    args = [sys.executable, "-m", "ultra_adaptive_kv_cache_engine", "serve", "--port", "0"]
    for name, value in config.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_serving(process: subprocess.Popen, log: Path) -> str:
    """The URL of the launched `uakv serve` once its /health answers 200."""
    deadline = time.monotonic() + 300  # a bound against a hang (the model loads in this time)
    while time.monotonic() < deadline:
        found = re.search(r"uakv serve: \S+ on (http://\S+)", log.read_text())
        if found:
            try:
                if httpx.get(f"{found.group(1)}/health", timeout=5).status_code == 200:
                    return found.group(1)
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            raise AssertionError(f"uakv serve exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.1)
    raise AssertionError(f"uakv serve did not start:\n{log.read_text()}")


def client_of(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def chat(client: openai.OpenAI, messages: list[dict]) -> tuple[str, int]:
    answer = client.chat.completions.create(model=smollm_model_id(), messages=messages, max_tokens=8,
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


def wait_idle(url: str) -> dict:
    """The instance's cache digest once nothing is in flight and its pool holds no sequence and no block."""
    deadline = time.monotonic() + 300
    while True:
        digest = httpx.get(f"{url}/v1/cache/digest", timeout=30).json()
        busy = httpx.get(f"{url}/health", timeout=30).json()["in_flight"]
        pool = digest["pool"]
        if busy == 0 and pool["sequences"] == 0 and pool["free"] == pool["blocks"] or time.monotonic() > deadline:
            return digest
        time.sleep(0.1)


def metric(url: str, name: str) -> float:
    """The value of the unlabelled Prometheus sample `name` on the instance's /metrics."""
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{url}/metrics has no {name}")


def test_fleet_shares_prefixes_and_survives_losing_a_server_and_a_redis_master(tmp_path):
    nodes = start_cluster(tmp_path / "redis", 3)
    ports = [n.port for n in nodes]
    config = fleet_config(f"redis://127.0.0.1:{ports[0]}/0?cluster=true")
    logs = [tmp_path / f"serve{i}.log" for i in range(3)]
    processes = [launch_uakv_serve(config, log) for log in logs]  # the three load their models at once
    try:
        urls = [wait_serving(p, log) for p, log in zip(processes, logs, strict=True)]

        # 1. A prefix computed behind one server is a hit behind another, with the same greedy answer.
        first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What does a block hold?"}]
        computed, cached = chat(client_of(urls[0]), first)
        assert cached == 0
        wait_for_write_through(ports)
        again, cached = chat(client_of(urls[1]), first)
        assert cached > 0 and again == computed

        # 2. Through the router (digest routing): it sees that prefix on the two servers that hold it, though
        #    it routed neither request; then conversations while a Redis master and a server die mid-run.
        router_config = RouterConfig(instances=tuple(urls), port=0, health_interval_s=0.5, digest_interval_s=0.2)
        with BackgroundServer(create_router_app(router_config)) as router, ThreadPoolExecutor(3) as pool:
            client = client_of(router.url)
            wait_digests(router.url, urls)
            follow = [*first, {"role": "assistant", "content": computed}, {"role": "user", "content": "Why?"}]
            served = client.chat.completions.with_raw_response.create(
                model=smollm_model_id(), messages=follow, max_tokens=8, temperature=0).headers["x-uakv-instance"]
            assert served in urls[:2]
            router_metrics = httpx.get(f"{router.url}/metrics").text.splitlines()
            assert 'uakv_router:decisions_total{decision="cache"} 1.0' in router_metrics
            assert 'uakv_router:prefix_source_total{source="digest"} 1.0' in router_metrics
            talks = [[{"role": "system", "content": f"Conversation {i}. {SYSTEM}"},
                      {"role": "user", "content": f"Question {i}: why reuse a prefix?"}] for i in range(6)]
            for turn in range(3):
                pending = [pool.submit(chat, client, talk) for talk in talks]
                if turn == 1:
                    time.sleep(0.2)  # the turn's requests are in flight
                    nodes[2].stop()
                    processes[2].send_signal(signal.SIGKILL)
                answers = [p.result() for p in pending]  # every request succeeds (none raises)
                for talk, (text, _) in zip(talks, answers, strict=True):
                    talk += [{"role": "assistant", "content": text}, {"role": "user", "content": "And then?"}]
            health = httpx.get(f"{router.url}/health").json()
            assert {i["url"]: i["healthy"] for i in health["instances"]}[urls[2]] is False

        # 3. No wrong block was served anywhere; the survivors' pools balance at idle.
        check_survivors(urls[:2], processes[:2], logs[:2])
    finally:
        for process in processes:  # each by its pid
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        for n in nodes:
            n.stop()


def check_survivors(urls: list[str], processes: list[subprocess.Popen], logs: list[Path]) -> None:
    """At idle: no sequence, every block free, shadow checks made and none mismatched; then a graceful stop
    (SIGTERM) finishes the checks still queued and would log any mismatch they find."""
    for url in urls:
        pool = wait_idle(url)["pool"]
        assert pool["sequences"] == 0 and pool["free"] == pool["blocks"], pool
        assert metric(url, "uakv:shadow_checks_total") > 0
        assert metric(url, "uakv:shadow_mismatches_total") == 0
    for process, log in zip(processes, logs, strict=True):
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 0, log.read_text()
        assert "shadow verification:" not in log.read_text()


def smollm_model_id() -> str:
    """The served model's name (the embedded SmolLM2's converted folder), without loading its weights."""
    from ultra_adaptive_kv_cache_engine.model.loader import resolve_model_folder

    return resolve_model_folder(KVCacheConfig()).name


def wait_digests(router_url: str, urls: list[str]) -> None:
    """Until the router holds a digest of every instance (polled at its interval)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if all(i["digest"] is not None for i in httpx.get(f"{router_url}/health").json()["instances"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"the router has no digest of some of {urls}")
