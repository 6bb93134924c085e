"""Fleets: what routing and a global tier buy, what a shared prefix costs on another server, what the router and
shadow verification cost.

Questions (each against its baseline in the same run):
- sim: on the Mooncake conversation trace, token hit rate and prefill tokens saved for N = 1..128 instances of
  3M tokens, per routing policy, with and without a global tier (3M tokens per instance), against one cache of
  the summed capacity. Goal at N=16: cache_aware + global >= 0.9x one cache, >= 2x round_robin local-only.
- loopback: two SmolLM2 servers (in-thread uakv serve apps) sharing one real redis-server, the router in
  front. TTFT of a prompt computed on the other server (promoted from Redis) vs a miss (goal <= 0.3x); the
  router's added p50 TTFT on a cached prompt, routed vs sent directly to the same instance, interleaved
  (goal <= 5 ms; on two tiny-model instances, whose few-ms TTFT leaves the router's cost visible).
- shadow: requests served with a cached system prompt, throughput with shadow_fraction 0.01 vs 0 (two
  engines, interleaved rounds; goal: >= 0.97x).
Output: one JSON line per part; full runs write benchmarks/results/fleet_<part>.json (and fleet_sim.png);
`--quick` (a 2-core minute: N up to 16 on the first 3000 requests, short prompts, few rounds) writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_common import RESULTS, bible_text, emit

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.policies.fleet import (
    ONE_CACHE,
    FleetSpec,
    FleetSweep,
    load_compiled,
    plot_fleet,
    run_fleet,
)
from ultra_adaptive_kv_cache_engine.policies.replay.simulator import CompiledTrace

TRACE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "traces" / "mooncake-fast25" / "conversation_trace.jsonl"
SECRET = "bench-fleet-secret-0123456789ab"


def part_sim(args: argparse.Namespace) -> dict:
    trace, arrivals = load_compiled(args.trace)
    if args.quick:
        trace = CompiledTrace(trace.name, trace.keys[:3000], trace.tokens[:3000], trace.block_tokens)
        arrivals = arrivals[:3000]
    sizes = (1, 4, 16) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128)
    template = FleetSpec(1, 3_000_000, routing_options={"balance_abs": 1.0, "balance_rel": 1.5})
    sweep = FleetSweep(sizes, ("round_robin", "least_loaded", "cache_aware"), template, 3_000_000, args.workers)
    results = run_fleet(trace, arrivals, sweep)
    if not args.quick:
        plot_fleet(results, RESULTS / "fleet_sim.png", title=f"{trace.name}: 3M tokens per instance, LRU")
    at16 = {(r.routing, r.global_tokens > 0): r.token_hit_rate for r in results if r.instances == 16}
    ours, bound, rr = at16[("cache_aware", True)], at16[(ONE_CACHE, False)], at16[("round_robin", False)]
    table = [{"routing": r.routing, "global_tier": r.global_tokens > 0, "instances": r.instances,
              "token_hit_rate": round(r.token_hit_rate, 4), "local_hit_rate": round(r.local_hit_rate, 4),
              "prefill_tokens_saved": r.prefill_tokens_saved, "busiest_share": round(r.busiest_share, 3),
              "mean_queue_s": round(r.mean_queue_s, 3)} for r in results]
    return {"trace": trace.name, "requests": trace.requests, "local_tokens": 3_000_000,
            "global_tokens_per_instance": 3_000_000, "at_16": {"cache_aware_global": ours, "one_cache": bound,
                                                               "round_robin_local": rr},
            "vs_one_cache": ours / bound, "vs_round_robin_local": ours / rr,
            "goal_met": ours >= 0.9 * bound and ours >= 2 * rr, "table": table}


class Redis:
    """One redis-server on a free loopback port, killed by its pid."""

    def __init__(self, folder: Path) -> None:
        from ultra_adaptive_kv_cache_engine.server.run import bind_socket

        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        sock.close()
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.process = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                         "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        self.client = client

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def ttft(client: httpx.Client, url: str, model: str, text: str) -> tuple[float, str | None]:
    """Seconds to the first streamed token of a greedy completion, and the instance that served it."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 2, "temperature": 0,
            "stream": True}
    started = time.perf_counter()
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        first = None
        for line in answer.iter_lines():
            if first is None and line.startswith("data:") and '"content"' in line:
                first = time.perf_counter() - started
        if first is None:
            raise RuntimeError(f"no token streamed from {url}")
    return first, answer.headers.get("x-uakv-instance")


def wait_written(redis_client: object, previous: int) -> int:
    """Until the Redis key count has grown past `previous` and stopped growing."""
    last = -1
    for _ in range(400):
        now = redis_client.dbsize()  # type: ignore[attr-defined]
        if now > previous and now == last:
            return now
        last = now
        time.sleep(0.1)
    return last


def part_loopback(args: argparse.Namespace) -> dict:
    from ultra_adaptive_kv_cache_engine.model.loader import load_model
    from ultra_adaptive_kv_cache_engine.server.app import create_app
    from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
    from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

    folder = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    redis = Redis(folder)
    model = load_model(KVCacheConfig(device="cpu"))
    config = KVCacheConfig(device="cpu", redis_url=f"redis://127.0.0.1:{redis.port}/0", tier_secret=SECRET,
                           cpu_tier_bytes=0, max_memory=512 * 1024**2)
    engines = [UltraAdaptiveKVCacheEngine(config, model=model) for _ in range(2)]
    servers = [BackgroundServer(create_app(e, ServerConfig(port=0), model)) for e in engines]
    verses, repeats, pairs = (20, 2, 20) if args.quick else (60, 5, 200)
    try:
        for s in servers:
            s.__enter__()
        a, b = (s.url for s in servers)
        name = model.model_id
        remote, miss = [], []
        with httpx.Client(timeout=600) as client:
            keys = 0
            for r in range(repeats):
                shared = f"Passage {r}. " + bible_text(verses, start=200 * r)
                fresh = f"Passage {r}. " + bible_text(verses, start=200 * r + 100)
                ttft(client, a, name, shared)  # computed on a, written through to Redis
                keys = wait_written(redis.client, keys)
                remote.append(ttft(client, b, name, shared)[0])
                miss.append(ttft(client, b, name, fresh)[0])
        tokens = len(model.tokenizer.chat([{"role": "user", "content": shared}]))
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.close()
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
    direct, routed = router_pairs(pairs)
    ratio = statistics.median(remote) / statistics.median(miss)
    added_ms = (statistics.median(routed) - statistics.median(direct)) * 1e3
    return {"model": name, "prompt_tokens": tokens, "repeats": repeats,
            "ttft_remote_hit_s": statistics.median(remote), "ttft_miss_s": statistics.median(miss),
            "remote_vs_miss": ratio, "remote_goal_met": ratio <= 0.3, "router_pairs": pairs,
            "ttft_direct_p50_ms": statistics.median(direct) * 1e3, "ttft_routed_p50_ms": statistics.median(routed) * 1e3,
            "router_added_p50_ms": added_ms, "router_goal_met": added_ms <= 5.0}


def router_pairs(pairs: int) -> tuple[list[float], list[float]]:
    """TTFT of one cached prompt sent straight to an instance and through the router to the same instance,
    interleaved. On two tiny-model instances: the router's own cost, which SmolLM2's CPU step time would hide."""
    from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama
    from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
    from ultra_adaptive_kv_cache_engine.server.app import create_app
    from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
    from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

    tiny = build_tiny_llama()
    engines = [UltraAdaptiveKVCacheEngine(KVCacheConfig(block_size=4, max_memory=8 * 1024**2), model=tiny)
               for _ in range(2)]
    servers = [BackgroundServer(create_app(e, ServerConfig(port=0), tiny)) for e in engines]
    direct: list[float] = []
    routed: list[float] = []
    try:
        for s in servers:
            s.__enter__()
        config = RouterConfig(instances=tuple(s.url for s in servers), port=0)
        with BackgroundServer(create_router_app(config)) as router, httpx.Client(timeout=60) as client:
            prompt = "Say hello to the fleet. " * 8
            _, where = ttft(client, router.url, tiny.model_id, prompt)
            assert where is not None
            for _ in range(pairs):
                direct.append(ttft(client, where, tiny.model_id, prompt)[0])
                routed.append(ttft(client, router.url, tiny.model_id, prompt)[0])
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.close()
    return direct, routed


async def _round(engine: UltraAdaptiveKVCacheEngine, prompts: list[str], concurrency: int) -> None:
    for start in range(0, len(prompts), concurrency):
        await asyncio.gather(*(engine.process_request({"action": "process", "messages": [
            {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": p}], "max_new_tokens": 8,
            "temperature": 0}) for p in prompts[start : start + concurrency]))


SYSTEM_PROMPT = ("You are a helpful assistant. Use the following reference passage when it is relevant. "
                 + "In the beginning God created the heavens and the earth. " * 12)


def part_shadow(args: argparse.Namespace) -> dict:
    from ultra_adaptive_kv_cache_engine.model.loader import load_model

    model = load_model(KVCacheConfig(device="cpu"))
    rounds, per_round = (2, 8) if args.quick else (10, 20)
    fractions = {"off": 0.0, "one_percent": 0.01}
    engines = {k: UltraAdaptiveKVCacheEngine(KVCacheConfig(device="cpu", shadow_fraction=f, cpu_tier_bytes=0,
                                                           max_memory=512 * 1024**2), model=model)
               for k, f in fractions.items()}
    seconds = dict.fromkeys(fractions, 0.0)
    try:
        for engine in engines.values():  # warm: the system prompt cached, the first request's costs paid
            asyncio.run(_round(engine, ["Warm up."], 1))
        for r in range(rounds):
            for key in (list(fractions) if r % 2 == 0 else list(fractions)[::-1]):
                prompts = [f"Question {r}-{i}: what is verse {i} about?" for i in range(per_round)]
                started = time.perf_counter()
                asyncio.run(_round(engines[key], prompts, 4))
                engines[key]._model_session().shadow.drain()  # the checks' work is counted in their round
                seconds[key] += time.perf_counter() - started
        checks = engines["one_percent"].get_stats()["model"]["shadow"]
    finally:
        for engine in engines.values():
            engine.close()
    requests = rounds * per_round
    throughput = {k: requests / s for k, s in seconds.items()}
    ratio = throughput["one_percent"] / throughput["off"]
    return {"model": model.model_id, "requests_per_config": requests, "throughput_req_s": throughput,
            "shadow_checks": checks["checks"], "shadow_mismatches": checks["mismatches"],
            "one_percent_vs_off": ratio, "goal_met": ratio >= 0.97}


PARTS = {"sim": part_sim, "loopback": part_loopback, "shadow": part_shadow}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-core minute; writes no results")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--trace", default=str(TRACE), help="Mooncake conversation trace (JSONL)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the simulation (default 2)")
    args = parser.parse_args()
    for name in PARTS if args.part == "all" else [args.part]:
        print(f"bench_fleet: {name}...", file=sys.stderr)
        emit(f"fleet_{name}", {"quick": args.quick, **PARTS[name](args)}, save=not args.quick)


if __name__ == "__main__":
    main()
