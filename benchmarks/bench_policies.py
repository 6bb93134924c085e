"""Eviction policies on request traces: token hit rate per capacity, against Belady's offline bound.

Question: at each capacity, how close does each policy come to Belady's optimum, and does the adaptive
policy beat the fixed ones (LRU, S3-FIFO, ARC: same run, same trace) without ever falling more than 0.5 points
below the best of them (`*_minus_best_fixed_pts` on token hit rate, `*_block_minus_best_fixed_pts` on block)?
Trace: `--trace PATH` (Mooncake JSONL schema, see policies/replay/trace.py), repeatable; without one, a
synthetic workload (`--workload`, default mix; seed 1, a seed the policies were not tuned on).
Output: one JSON line per trace (rates in percent, deltas in points) and a PNG of hit rate vs capacity,
both under benchmarks/results/ as policies_<trace>.json / .png. Each line also carries `live_replay`: the
trace's first requests replayed through the live `KVCacheManager` (as tests/test_live_replay.py does) next to
the simulator's counts (on the live block names) for every policy, and `cost_per_block_us`: a replay's CPU time per block of each
policy (best of 5 interleaved rounds), with its ratio to LRU's (same run, same requests).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from bench_common import RESULTS, emit

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.policies import POLICIES, make_policy
from ultra_adaptive_kv_cache_engine.policies.replay import (
    BELADY,
    WORKLOADS,
    CompiledTrace,
    ReplayResult,
    TraceRequest,
    WorkloadSpec,
    compile_trace,
    generate_workload,
    load_trace,
    plot_hit_rates,
    run_replay,
    simulate,
)
from ultra_adaptive_kv_cache_engine.policies.replay.simulator import RequestClock

FULL_CAPACITIES = "0.5M,1M,3M,10M,25M"
QUICK_CAPACITIES = "0.25M,0.5M,1M,3M"
FIXED = ["lru", "s3fifo", "arc"]  # the fixed choices an adaptive policy must never fall 0.5 points below
ADAPTIVE = [p for p in POLICIES if "adaptive" in p]
LIVE_REQUESTS, LIVE_BLOCKS, LIVE_BLOCK = 300, 48, 4
COST_REQUESTS = 2000
COST_ROUNDS = 5  # best of; CPU time of this process (the machine is shared), not wall time


def parse_capacities(text: str) -> list[int]:
    """'0.5M,1M,300k,4096' -> token counts."""
    scale = {"k": 1_000, "m": 1_000_000}
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        mult = scale.get(part[-1:], 1)
        number = part[:-1] if part[-1:] in scale else part
        try:
            out.append(int(float(number) * mult))
        except ValueError:
            raise SystemExit(f"--capacities: {part!r} is not a number of tokens such as 512k or 3M") from None
    return out


def summarise(name: str, results: list[ReplayResult], caps: list[int], seconds: float) -> dict:
    def rates(policy: str, field: str = "token_hit_rate") -> list[float]:
        row = {r.capacity_tokens: getattr(r, field) for r in results if r.policy == policy}
        return [round(100 * row[c], 3) for c in caps]

    policies = list(dict.fromkeys(r.policy for r in results))
    token = {p: rates(p) for p in policies}
    first = results[0]
    out = {
        "trace": name, "requests": first.requests, "blocks": first.blocks, "tokens": first.tokens,
        "capacities_tokens": caps, "token_hit_rate_pct": token,
        "block_hit_rate_pct": {p: rates(p, "block_hit_rate") for p in policies},
        "bytes_loaded_gib": {p: [round(r.bytes_loaded / 2**30, 1) for r in results if r.policy == p] for p in policies},
        "replay_seconds": round(seconds, 1),
    }
    fixed = [p for p in FIXED if p in token]
    block = out["block_hit_rate_pct"]
    for p in ADAPTIVE:
        if p not in token or not fixed:
            continue
        for rate, prefix in ((token, ""), (block, "block_")):
            best = [max(rate[f][i] for f in fixed) for i in range(len(caps))]
            delta = [round(a - b, 3) for a, b in zip(rate[p], best, strict=True)]
            out[f"{p}_{prefix}minus_best_fixed_pts"] = delta
            out[f"{p}_{prefix}never_below_best_fixed_by_0_5"] = min(delta) >= -0.5
        if p in token and BELADY in token:
            out[f"{p}_share_of_belady"] = [round(a / b, 3) if b else None for a, b in zip(token[p], token[BELADY], strict=True)]
    return out


def live_cache(policy: str) -> KVCacheManager:
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=LIVE_BLOCK, dtype=torch.float32)
    return KVCacheManager(KVCacheConfig(block_size=LIVE_BLOCK, cache_strategy=policy, device="cpu"), spec,
                          num_blocks=LIVE_BLOCKS)


def live_tokens(keys: tuple, names: dict[object, int]) -> list[int]:
    """`LIVE_BLOCK` token ids of its own per trace block id (the first `LIVE_BLOCKS` of a request)."""
    return [t for k in keys[:LIVE_BLOCKS] for t in range(LIVE_BLOCK * names.setdefault(k, len(names)),
                                                         LIVE_BLOCK * names[k] + LIVE_BLOCK)]


def live_names(trace: CompiledTrace) -> CompiledTrace:
    """`trace` with its block ids replaced by the live cache's chained hashes (policies that sample keys by
    a stable hash of their names then see the same keys in both replays)."""
    cache, names = live_cache("lru"), {}
    keys = tuple(tuple(cache.hash_prompt(live_tokens(k, names))) for k in trace.keys)
    return CompiledTrace(trace.name, keys, trace.tokens, trace.block_tokens)


def live_replay(trace: CompiledTrace, policy: str) -> list[int]:
    """(hit, stored, evicted) blocks of `trace` through the live `KVCacheManager` of `policy`."""
    cache = live_cache(policy)
    names: dict[object, int] = {}
    hits = 0
    for keys in trace.keys:
        tokens = live_tokens(keys, names)
        seq = cache.new_sequence(tokens)
        cached = cache.num_cached_tokens(seq)
        hits += cached // LIVE_BLOCK
        zeros = [torch.zeros(1, len(tokens) - cached, 4)]
        cache.append(seq, tokens[cached:], zeros, zeros)
        cache.commit(seq)
        cache.free(seq)
    stats = cache.stats()
    return [hits, int(stats["committed_blocks"]), int(stats["block_evictions"])]


def live_agreement(requests: list[TraceRequest], block_tokens: int, policies: list[str]) -> dict:
    """The first `LIVE_REQUESTS` requests, live and simulated, at `LIVE_BLOCKS` blocks: equal counts."""
    trace = compile_trace(requests[:LIVE_REQUESTS], block_tokens, "live")
    named = live_names(trace)
    out = {}
    for p in policies:
        if p == BELADY:
            continue
        clock = RequestClock()
        cap = LIVE_BLOCKS * block_tokens
        sim = simulate(named, make_policy(p, cap, clock), cap, clock)
        live = live_replay(trace, p)
        out[p] = {"live": live, "simulated": [sim.hit_blocks, sim.stored_blocks, sim.evicted_blocks],
                  "equal": live == [sim.hit_blocks, sim.stored_blocks, sim.evicted_blocks]}
    return {"requests": trace.requests, "blocks": LIVE_BLOCKS, "policies": out,
            "all_equal": all(v["equal"] for v in out.values())}


def policy_cost(requests: list[TraceRequest], block_tokens: int, capacity: int, policies: list[str]) -> dict:
    """CPU microseconds per replayed block (every policy event of a replay, the simulator's loop included)."""
    trace = compile_trace(requests[:COST_REQUESTS], block_tokens, "cost")
    names = [p for p in policies if p != BELADY]
    best = dict.fromkeys(names, float("inf"))
    for _ in range(COST_ROUNDS):  # rounds interleaved: a change of the machine's load hits every policy alike
        for p in names:
            clock = RequestClock()
            policy = make_policy(p, capacity, clock)
            started = time.process_time()
            simulate(trace, policy, capacity, clock)
            best[p] = min(best[p], time.process_time() - started)
    us = {p: round(1e6 * t / trace.blocks, 3) for p, t in best.items()}
    base = us.get("lru")
    return {"capacity_tokens": capacity, "us": us,
            "ratio_vs_lru": {p: round(v / base, 2) for p, v in us.items()} if base else None}


def traces(args: argparse.Namespace) -> list[tuple[str, list[TraceRequest]]]:
    if args.trace:
        return [(Path(p).stem, load_trace(p)) for p in args.trace]
    spec = WorkloadSpec(requests=args.requests, seed=args.seed, block_tokens=args.block_tokens)
    out = []
    for name in args.workload or ["mix"]:
        started = time.perf_counter()
        out.append((f"synthetic-{name}", generate_workload(name, spec)))
        print(f"generated {name}: {args.requests} requests in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", action="append", help="Mooncake-schema JSONL trace (repeatable)")
    ap.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="synthetic workload (repeatable)")
    ap.add_argument("--requests", type=int, default=None, help="synthetic requests (default 20000; quick 4000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--capacities", default=None, help=f"tokens, comma separated (default {FULL_CAPACITIES})")
    ap.add_argument("--policies", default=",".join([*POLICIES, BELADY]))
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument("--bytes-per-token", type=int, default=128 * 1024)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true", help="4000 requests, capacities " + QUICK_CAPACITIES)
    ap.add_argument("--no-save", action="store_true", help="print only; write nothing under results/")
    args = ap.parse_args()
    if args.requests is None:
        args.requests = 4000 if args.quick else 20_000
    caps = parse_capacities(args.capacities or (QUICK_CAPACITIES if args.quick else FULL_CAPACITIES))
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    out_dir = Path(os.environ.get("UAKV_RESULTS_DIR", RESULTS))
    for name, requests in traces(args):
        started = time.perf_counter()
        results = run_replay(requests, caps, policies, block_tokens=args.block_tokens,
                             bytes_per_token=args.bytes_per_token, workers=args.workers, name=name)
        summary = summarise(name, results, caps, time.perf_counter() - started)
        summary["quick"] = args.quick
        summary["live_replay"] = live_agreement(requests, args.block_tokens, policies)
        summary["cost_per_block_us"] = policy_cost(requests, args.block_tokens, caps[len(caps) // 2], policies)
        if not args.no_save and not args.quick:
            out_dir.mkdir(parents=True, exist_ok=True)
            png = plot_hit_rates(results, out_dir / f"policies_{name}.png", title=f"{name} ({len(requests)} requests)")
            summary["plot"] = f"benchmarks/results/{png.name}"
        emit(f"policies_{name}", summary, save=not (args.no_save or args.quick))


if __name__ == "__main__":
    main()
