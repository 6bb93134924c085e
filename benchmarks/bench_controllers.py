"""The adaptive controllers against not acting, each on a workload of its own, in the same run.

Questions (one JSON line answers all):
- predictor: is the forecast request rate closer to what comes next than the last interval's count or the
  long-run mean (trend + noise + a step change)? Is its hit-rate curve the hit rate a real LRU tier gets?
- prefetcher: live conversations over a small CPU tier and a disk tier; does promoting the previous turn of
  the conversations due next raise the fast tier's hit rate over LRU alone?
- autoscaler: two tenants share one memory budget; in each phase one reuses a hot set and the other scans,
  and they swap roles every phase; does rescaling from the predicted hit-rate curves (decayed with a 5 s
  half-life, phases last 40 s or more) beat every fixed split it moves between?
- optimizer: advanced_optimization's measured improvements (memory bytes, latency, throughput time).
- metrics collector: cost of one event (a lookup), so that it can stay on the hot path.
- live (`--live` alone, or in every run): the controllers as the engine runs them (`Controllers`), each against
  all off, on a multi-turn conversation replay through the real cache manager (see controllers_live.py).
All workloads are seeded and run on a simulated clock; tiers are the real CPUTier and DiskTier.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_common import emit
from controllers_live import bench_live

from ultra_adaptive_kv_cache_engine.cache.tier_controls import ResizableTier, StoreBlockSource
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.engine.autoscaler import AutoScaler, ScaledTier
from ultra_adaptive_kv_cache_engine.engine.metrics_collector import AdvancedMetricsCollector
from ultra_adaptive_kv_cache_engine.engine.optimizer import PerformanceOptimizer
from ultra_adaptive_kv_cache_engine.engine.predictor import WorkloadPredictor
from ultra_adaptive_kv_cache_engine.engine.prefetcher import CachePrefetcher
from ultra_adaptive_kv_cache_engine.tiers import BlockRecord, CPUTier, DiskTier, TieredStore, encode_block

NS = hashlib.sha256(b"bench-controllers").digest()
CODEC = make_codec("identity")


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def key(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


def record(name: str, floats: int = 256) -> BlockRecord:
    return encode_block(key(name), NS, torch.zeros(floats), CODEC)


# -- predictor ------------------------------------------------------------------------------------------------
def bench_predictor(rng: random.Random, seconds: int) -> dict[str, float]:
    clock = SimClock()
    predictor = WorkloadPredictor(clock, interval_s=1.0, alpha=0.3, beta=0.1)
    counts = []
    for t in range(seconds):
        base = 20 + 10 * math.sin(t / 60) + 0.05 * t + (25 if t > seconds // 2 else 0)
        counts.append(sum(rng.random() < base / 50 for _ in range(50)) + int(rng.gauss(0, 2) ** 2))
    horizon = 5
    errors = {"predictor": [], "last_interval": [], "running_mean": []}
    for t, count in enumerate(counts):
        for i in range(count):
            clock.now = t + (i + 0.5) / max(1, count)
            predictor.observe_request([f"r{t}-{i}"], 1)
        clock.now = t + 1.0
        if t >= 30 and t + horizon < len(counts):
            actual = statistics.fmean(counts[t + 1 : t + 1 + horizon])
            errors["predictor"].append(abs(predictor.forecast(horizon).request_rate - actual))
            errors["last_interval"].append(abs(count - actual))
            errors["running_mean"].append(abs(statistics.fmean(counts[: t + 1]) - actual))
    mae = {name: statistics.fmean(e) for name, e in errors.items()}
    return {
        "forecast_mae": mae["predictor"],
        "last_interval_mae": mae["last_interval"],
        "running_mean_mae": mae["running_mean"],
        **bench_hit_rate_curve(rng),
    }


def bench_hit_rate_curve(rng: random.Random) -> dict[str, float]:
    """Predicted LRU hit rate vs a real CPUTier's at several capacities, on a Zipf(0.9) block stream."""
    names = [f"z{i}" for i in range(2000)]
    weights = [1 / (i + 1) ** 0.9 for i in range(len(names))]
    stream = rng.choices(names, weights, k=20000)
    size = record("probe").nbytes
    predictor = WorkloadPredictor(SimClock(), half_life_s=None, unit_bytes=size)
    for name in stream:
        predictor.observe_access(name, size)
    errors = []
    for blocks in (50, 200, 800):
        tier = CPUTier(NS, blocks * size, pin_memory=False)
        hits = 0
        for name in stream:
            if tier.get(key(name)) is not None:
                hits += 1
            else:
                tier.put(key(name), record(name))
        errors.append(abs(predictor.hit_rate(blocks * size) - hits / len(stream)))
    return {"hit_rate_curve_max_abs_error": max(errors)}


# -- prefetcher -------------------------------------------------------------------------------------------------
def bench_prefetcher(rng: random.Random, conversations: int, root: Path) -> dict[str, float]:
    plans = []  # (start time, think gaps, new blocks per turn) per conversation
    for _ in range(conversations):
        turns = rng.randint(3, 8)
        gaps = [rng.lognormvariate(math.log(30), 0.25) for _ in range(turns - 1)]
        plans.append((rng.uniform(0, 300), gaps, [rng.randint(2, 5) for _ in range(turns)]))
    total_blocks = sum(sum(p[2]) for p in plans)
    out = {}
    for mode in ("lru", "prefetch"):
        out[mode] = run_conversations(plans, prefetch=mode == "prefetch", root=root / mode,
                                      fast_blocks=max(16, total_blocks // 12))  # fmt: skip
    return {
        "fast_hit_rate_lru": out["lru"][0],
        "fast_hit_rate_prefetch": out["prefetch"][0],
        "disk_reads_lru": out["lru"][1],
        "disk_reads_prefetch": out["prefetch"][1],
        "promoted_blocks": out["prefetch"][2],
        "conversations": conversations,
    }


def run_conversations(plans, prefetch: bool, root: Path, fast_blocks: int) -> tuple[float, int, int]:
    clock = SimClock()
    size = record("probe").nbytes
    fast = CPUTier(NS, fast_blocks * size, pin_memory=False, name="cpu")
    disk = DiskTier(NS, root, 10**9, fsync="never", name="disk")
    store = TieredStore([fast, disk])
    source = StoreBlockSource(store)
    prefetcher = CachePrefetcher(source, "cpu", clock, lookahead_s=3.0, max_blocks=64)
    events = sorted(
        (start + sum(gaps[:turn]), cid, turn)
        for cid, (start, gaps, _) in enumerate(plans)
        for turn in range(len(gaps) + 1)
    )  # fmt: skip
    chains: dict[int, list[str]] = {}
    fast_hits = lookups = disk_reads = 0
    next_tick = 0.0
    for at, cid, turn in events:
        while prefetch and next_tick <= at:
            clock.now = next_tick
            prefetcher.step()
            next_tick += 1.0
        clock.now = at
        chain = chains.setdefault(cid, [])
        for name in chain:
            where = source.tier_of(key(name))
            lookups += 1
            fast_hits += where == "cpu"
            disk_reads += where == "disk"
        store.get_many([key(n) for n in chain])
        for _ in range(plans[cid][2][turn]):
            chain.append(f"c{cid}-{len(chain)}")
            store.put(key(chain[-1]), record(chain[-1]))
        if turn == len(plans[cid][1]):
            prefetcher.end(str(cid))
        else:
            prefetcher.on_request(str(cid), [key(n) for n in chain])
    return fast_hits / max(1, lookups), disk_reads, prefetcher.promoted_total


# -- autoscaler -------------------------------------------------------------------------------------------------
def bench_autoscaler(rng: random.Random, accesses_per_phase: int) -> dict[str, float]:
    """Two tenants, 1000 blocks of memory. In each phase one tenant reuses a hot set of 800 blocks (Zipf 0.6)
    while the other scans blocks it never reads again; the roles swap every phase (4 phases)."""
    budget_blocks, hot = 1000, 800
    weights = [1 / (i + 1) ** 0.6 for i in range(hot)]
    streams = []
    for phase in range(4):
        per_tenant = []
        for t, tenant in enumerate("AB"):
            if (phase + t) % 2 == 0:
                names = [f"{tenant}{phase}-{i}" for i in range(hot)]
                per_tenant.append(rng.choices(names, weights, k=accesses_per_phase))
            else:
                per_tenant.append([f"{tenant}{phase}-scan{i}" for i in range(accesses_per_phase)])
        streams.append(per_tenant)
    results = {"autoscaled": run_tenants(streams, budget_blocks, None)}
    for share in (0.25, 0.5, 0.75):
        results[f"fixed_{int(share * 100)}"] = run_tenants(streams, budget_blocks, share)
    best_fixed = max(v for k, v in results.items() if k.startswith("fixed"))
    out = {f"hit_rate_{k}": v for k, v in results.items()}
    out["autoscaled_over_best_fixed"] = results["autoscaled"] / best_fixed
    return out


def run_tenants(streams, budget_blocks: int, fixed_share: float | None) -> float:
    clock = SimClock()
    size = record("probe").nbytes
    shares = (0.5, 0.5) if fixed_share is None else (fixed_share, 1 - fixed_share)
    tiers = [
        CPUTier(NS, int(budget_blocks * s) * size, pin_memory=False, name=n) for s, n in zip(shares, "AB", strict=True)
    ]
    predictors = [WorkloadPredictor(clock, half_life_s=5.0, unit_bytes=size) for _ in tiers]
    scaler = AutoScaler(
        [ScaledTier(ResizableTier(t), p, 50 * size, 950 * size) for t, p in zip(tiers, predictors, strict=True)],
        budget_bytes=budget_blocks * size, step_bytes=10 * size, horizon_s=10.0,
    )  # fmt: skip
    hits = total = 0
    for per_tenant in streams:
        for i, names in enumerate(zip(*per_tenant, strict=True)):
            clock.now += 0.01  # 100 accesses per simulated second per tenant
            for tier, predictor, name in zip(tiers, predictors, names, strict=True):
                predictor.observe_access(name, size)
                total += 1
                if tier.get(key(name)) is not None:
                    hits += 1
                else:
                    tier.put(key(name), record(name))
            if fixed_share is None and i % 500 == 499:
                scaler.step()
    return hits / total


# -- optimizer and metrics --------------------------------------------------------------------------------------
def bench_optimizer() -> dict[str, float]:
    torch.manual_seed(0)
    optimizer = PerformanceOptimizer()
    seed_entries = [torch.randn(1, 8, 64) for _ in range(256)]
    strided = [torch.randn(64, 256).t() for _ in range(64)]
    memory = optimizer.advanced_optimization(seed_entries, "memory")
    latency = optimizer.advanced_optimization(strided, "latency")
    throughput = optimizer.advanced_optimization(seed_entries, "throughput")
    return {
        "memory_improvement_pct": memory["improvement_percentage"],
        "memory_bytes_saved": memory["metrics"]["bytes_saved"],
        "latency_improvement_pct_strided": latency["improvement_percentage"],
        "throughput_improvement_pct": throughput["improvement_percentage"],
    }


def bench_metrics(events: int) -> dict[str, float]:
    collector = AdvancedMetricsCollector()
    keys = [f"k{i % 5000}" for i in range(events)]
    start = time.perf_counter()
    for i, k in enumerate(keys):
        collector.record_lookup(k, "cpu" if i % 3 else None)
    per_event = (time.perf_counter() - start) / events
    requests = AdvancedMetricsCollector()  # what the engine calls: one record_request per request of 32 blocks
    tiers = ["pool"] * 16 + ["cpu"] * 8 + ["disk"] * 4 + [None] * 4
    start = time.perf_counter()
    for i in range(0, events, 32):
        requests.record_request(keys[i : i + 32], tiers[: len(keys[i : i + 32])], 0.05, 512, 448)
    per_block = (time.perf_counter() - start) / events
    return {"lookup_event_us": per_event * 1e6, "request_per_block_us": per_block * 1e6,
            "exposition_bytes": len(collector.exposition())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller workloads (under a minute on 2 cores)")
    parser.add_argument("--live", action="store_true", help="the live section only (results are not saved)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable timings on a shared 2-core machine; 0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    result: dict[str, object] = {"seed": args.seed, "quick": args.quick, "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()
    if not args.live:
        log("predictor ...")
        result["predictor"] = bench_predictor(rng, 600 if args.quick else 1800)
        log("prefetcher ...")
        with tempfile.TemporaryDirectory() as tmp:
            result["prefetcher"] = bench_prefetcher(rng, 60 if args.quick else 200, Path(tmp))
        log("autoscaler ...")
        result["autoscaler"] = bench_autoscaler(rng, 4000 if args.quick else 15000)
        log("optimizer ...")
        result["optimizer"] = bench_optimizer()
        result["optimizer"]["compute_or_load"] = "see bench_compute_or_load"
        result["metrics_collector"] = bench_metrics(20000 if args.quick else 200000)
    log("live replay through the cache manager ...")
    result["live"] = bench_live(random.Random(args.seed), args.quick, args.seed)
    result["seconds"] = time.perf_counter() - started
    # Only a full run writes benchmarks/results/; a quick or live-only run writes only where UAKV_RESULTS_DIR
    # points (make's quick target: an ignored folder).
    partial = args.quick or args.live
    emit("controllers", result, save=not args.no_save and (not partial or bool(os.environ.get("UAKV_RESULTS_DIR"))))


if __name__ == "__main__":
    main()
