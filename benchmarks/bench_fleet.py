"""Fleets: what routing and a global tier buy, what a shared prefix costs on another server, what the router and
shadow verification cost.

Questions (each against its baseline in the same run):
- sim: on the Mooncake conversation trace, token hit rate and prefill tokens saved for N = 1..128 instances of
  3M tokens, per routing policy, with and without a global tier (3M tokens per instance), against one cache of
  the summed capacity. Goal at N=16: cache_aware + global >= 0.9x one cache, >= 2x round_robin local-only.
- loopback: two SmolLM2 servers (in-thread uakv serve apps) sharing one real redis-server, the router in
  front (digest routing: it reads the servers' GET /v1/cache/digest and tokenizes as they do). TTFT of a
  prompt computed on the other server (promoted from Redis) vs a miss (goal <= 0.3x), and through the router,
  which finds the server that computed it (sent there directly, not through the router) from its digest; the
  router's added p50 TTFT on a cached prompt, routed vs sent directly to the same instance, interleaved with
  the text-chunk router as a second arm (goal <= 5 ms; on two tiny-model instances, whose few-ms TTFT leaves
  the router's cost visible); what tokenizing and hashing a SmolLM2 prompt costs the router (cold, and with
  its per-message memo).
- digest: the size and cost of a cache digest of 10k (and 100k) blocks: the full set against a delta after 1%
  of the blocks changed and an unchanged poll; packed binary and gzip sizes for comparison; the router's apply.
- shadow: requests served with a cached system prompt, throughput with shadow_fraction 0.01 vs 0 (two
  engines, interleaved rounds; goal: >= 0.97x).
Output: one JSON line per part; full runs write benchmarks/results/fleet_<part>.json (and fleet_sim.png);
`--quick` (a 2-core minute: N up to 16 on the first 3000 requests, short prompts, few rounds) writes only where
UAKV_RESULTS_DIR points (say benchmarks/results/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
    from ultra_adaptive_kv_cache_engine.router.tokens import PromptTokenizer
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
    times: dict[str, list[float]] = {"remote": [], "miss": [], "routed": []}
    holder = 0
    try:
        for s in servers:
            s.__enter__()
        a, b = (s.url for s in servers)
        route = RouterConfig(instances=(a, b), port=0, digest_interval_s=0.2)
        with BackgroundServer(create_router_app(route, PromptTokenizer(model.tokenizer))) as router, \
                httpx.Client(timeout=600) as client:
            keys = 0
            for r in range(repeats):
                shared = f"Passage {r}. " + bible_text(verses, start=200 * r)
                fresh = f"Passage {r}. " + bible_text(verses, start=200 * r + 100)
                ttft(client, a, model.model_id, shared)  # computed on a (not through the router), written to Redis
                keys = wait_written(redis.client, keys)
                wait_router_sees(client, router.url, a)
                seconds, where = ttft(client, router.url, model.model_id, shared)  # the router finds a
                times["routed"].append(seconds)
                holder += where == a
                times["remote"].append(ttft(client, b, model.model_id, shared)[0])
                times["miss"].append(ttft(client, b, model.model_id, fresh)[0])
        tokens = len(model.tokenizer.chat([{"role": "user", "content": shared}]))
        prompt_cost = router_prompt_cost(model, shared, repeats * 4)
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.close()
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return {"model": model.model_id, "prompt_tokens": tokens, "repeats": repeats,
            **loopback_ratios(times, holder, repeats), "router_prompt_ms": prompt_cost, **router_overhead(pairs)}


def loopback_ratios(times: dict[str, list[float]], holder: int, repeats: int) -> dict:
    remote, miss, routed = (statistics.median(times[k]) for k in ("remote", "miss", "routed"))
    return {"ttft_remote_hit_s": remote, "ttft_miss_s": miss, "remote_vs_miss": remote / miss,
            "remote_goal_met": remote / miss <= 0.3, "ttft_routed_to_holder_s": routed,
            "routed_vs_miss": routed / miss, "routed_to_holder": f"{holder}/{repeats}"}


def wait_router_sees(client: httpx.Client, router_url: str, instance_url: str) -> None:
    """Until the router's digest of the instance has the instance's current generation."""
    generation = client.get(f"{instance_url}/v1/cache/digest").json()["generation"]
    for _ in range(600):
        views = {i["url"]: i["digest"] for i in client.get(f"{router_url}/health").json()["instances"]}
        if (views.get(instance_url) or {}).get("generation") == generation:
            return
        time.sleep(0.05)
    raise RuntimeError(f"the router did not see generation {generation} of {instance_url}")


def router_prompt_cost(model: Any, text: str, rounds: int) -> dict:
    """Milliseconds the router spends on a SmolLM2 chat prompt: token ids (server parsers, tokenizer, chat
    template) and chained block hashes; cold (a new memo) and warm (the message encodings remembered)."""
    from ultra_adaptive_kv_cache_engine.router.digests import PromptBlocks
    from ultra_adaptive_kv_cache_engine.router.tokens import PromptTokenizer

    body = {"model": "m", "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                                       {"role": "user", "content": text}]}
    key = (bytes(32), 16, 8)
    cold, warm = [], []
    for _ in range(rounds):
        tokenizer = PromptTokenizer(model.tokenizer)
        for out in (cold, warm):
            started = time.perf_counter()
            ids = tokenizer.token_ids("/v1/chat/completions", body)
            PromptBlocks(ids).hashes(key)
            out.append((time.perf_counter() - started) * 1e3)
    return {"tokens": len(ids), "cold_p50_ms": statistics.median(cold), "warm_p50_ms": statistics.median(warm)}


def router_overhead(pairs: int) -> dict:
    direct, routed, text = router_pairs(pairs)
    added, added_text = ((statistics.median(x) - statistics.median(direct)) * 1e3 for x in (routed, text))
    return {"router_pairs": pairs, "ttft_direct_p50_ms": statistics.median(direct) * 1e3,
            "ttft_routed_p50_ms": statistics.median(routed) * 1e3, "router_added_p50_ms": added,
            "ttft_routed_text_p50_ms": statistics.median(text) * 1e3, "router_text_added_p50_ms": added_text,
            "router_goal_met": added <= 5.0}


def router_pairs(pairs: int) -> tuple[list[float], list[float], list[float]]:
    """TTFT of one cached prompt sent straight to an instance, through the digest router and through the
    text-chunk router, interleaved. On two tiny-model instances: the router's own cost, which SmolLM2's CPU
    step time would hide."""
    from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama
    from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
    from ultra_adaptive_kv_cache_engine.router.tokens import PromptTokenizer
    from ultra_adaptive_kv_cache_engine.server.app import create_app
    from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
    from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

    tiny = build_tiny_llama()
    engines = [UltraAdaptiveKVCacheEngine(KVCacheConfig(block_size=4, max_memory=8 * 1024**2), model=tiny)
               for _ in range(2)]
    servers = [BackgroundServer(create_app(e, ServerConfig(port=0), tiny)) for e in engines]
    arms: dict[str, list[float]] = {"direct": [], "digest": [], "text": []}
    try:
        for s in servers:
            s.__enter__()
        urls = tuple(s.url for s in servers)
        routers = {source: BackgroundServer(create_router_app(RouterConfig(instances=urls, port=0,
                                                                           prefix_source=source),
                                                              PromptTokenizer(tiny.tokenizer)))
                   for source in ("digest", "text")}
        with routers["digest"] as digest_router, routers["text"] as text_router, httpx.Client(timeout=60) as client:
            prompt = "Say hello to the fleet. " * 8
            _, where = ttft(client, digest_router.url, tiny.model_id, prompt)
            assert where is not None
            wait_router_sees(client, digest_router.url, where)
            ttft(client, text_router.url, tiny.model_id, prompt)
            for _ in range(pairs):
                arms["direct"].append(ttft(client, where, tiny.model_id, prompt)[0])
                arms["digest"].append(ttft(client, digest_router.url, tiny.model_id, prompt)[0])
                arms["text"].append(ttft(client, text_router.url, tiny.model_id, prompt)[0])
    finally:
        for s in servers:
            s.stop()
        for e in engines:
            e.close()
    return arms["direct"], arms["digest"], arms["text"]


def part_digest(args: argparse.Namespace) -> dict:
    """A digest of n random blocks: sizes (JSON full, JSON delta after 1% churn, packed, gzip) and the time of
    a full report, a delta, an unchanged poll and the router's apply of the full set and of the delta."""
    rng = random.Random(0)
    rows = [digest_row(n, rng, 3 if args.quick else 7) for n in ((10_000,) if args.quick else (10_000, 100_000))]
    return {"hash_bytes": 8, "churn": 0.01, "sizes": rows}


def digest_row(n: int, rng: random.Random, reps: int) -> dict:
    from ultra_adaptive_kv_cache_engine.cache.results import HeldBlocks
    from ultra_adaptive_kv_cache_engine.prefix import Namespace
    from ultra_adaptive_kv_cache_engine.router.digests import InstanceDigest
    from ultra_adaptive_kv_cache_engine.server.cache_digest import CacheDigest

    held = [rng.randbytes(32) for _ in range(n)]
    state = {"pool": tuple(held)}
    digest = CacheDigest(lambda: HeldBlocks(state["pool"], (), n, 0, 0),
                         Namespace("bench", "", "tokenizer", "float16", 16, 1), "bench")
    full, first_ms = timed(digest.report)  # the first snapshot: every block is a change
    full_ms = median_ms(digest.report, reps)  # unchanged snapshot, every hash formatted
    same_ms = median_ms(lambda: digest.report(since=digest.generation), reps)
    apply_full_ms = median_ms(lambda: InstanceDigest().apply(full, 0.0), reps)
    churn = n // 100
    state["pool"] = tuple(held[churn:] + [rng.randbytes(32) for _ in range(churn)])
    delta, change_ms = timed(lambda: digest.report(since=full["generation"]))  # with the set difference
    delta_ms = median_ms(lambda: digest.report(since=full["generation"]), reps)
    router = InstanceDigest()
    router.apply(full, 0.0)
    _, apply_delta_ms = timed(lambda: router.apply(delta, 0.0))
    assert len(router.held) == n and len(delta["added"]) == churn == len(delta["removed"])
    size = {k: len(json.dumps(v, separators=(",", ":")).encode()) for k, v in
            (("full", full), ("delta", delta), ("unchanged", digest.report(since=digest.generation)))}
    return {"blocks": n, "json_bytes": size, "gzip_full_bytes": len(gzip.compress(json.dumps(full).encode())),
            "packed_base64_full_bytes": len(base64.b64encode(b"".join(h[:8] for h in held))),
            "delta_vs_full_bytes": size["delta"] / size["full"],
            "report_ms": {"first_full": first_ms, "full": full_ms, "after_change_delta": change_ms,
                          "delta": delta_ms, "unchanged": same_ms},
            "router_apply_ms": {"full": apply_full_ms, "delta": apply_delta_ms}}


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    """(the result of `call()`, its milliseconds)."""
    started = time.perf_counter()
    out = call()
    return out, (time.perf_counter() - started) * 1e3


def median_ms(call: Callable[[], Any], reps: int) -> float:
    return statistics.median(timed(call)[1] for _ in range(reps))


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


PARTS = {"sim": part_sim, "loopback": part_loopback, "shadow": part_shadow, "digest": part_digest}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 2-core minute; writes no results")
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--trace", default=str(TRACE), help="Mooncake conversation trace (JSONL)")
    parser.add_argument("--workers", type=int, default=2, help="processes for the simulation (default 2)")
    args = parser.parse_args()
    for name in PARTS if args.part == "all" else [args.part]:
        print(f"bench_fleet: {name}...", file=sys.stderr)
        save = not args.quick or bool(os.environ.get("UAKV_RESULTS_DIR"))  # quick: only where it points
        emit(f"fleet_{name}", {"quick": args.quick, **PARTS[name](args)}, save=save)


if __name__ == "__main__":
    main()
