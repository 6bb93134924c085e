"""TTFT of a long prefix promoted from the CPU tier into a quantized (fp8) pool vs into a bf16 pool, one run.

Question: a quantized pool's blocks go to the tiers as their bytes (no decompress-recompress), so promoting a
cached prefix from the CPU tier moves about half the bytes in fp8; how much sooner does the first token come?
Live path: `Scheduler` -> `PagedLlamaBackend` -> `KVCacheManager.from_config` with a CPU tier below the pool
(page-locked on CUDA), a Llama-3-8B-shaped model with random bf16 weights, block size 16. Per arm (bf16 first,
the baseline, then each `--formats` pool): the prompt's full blocks are filled with random KV (sealed through
the backend's `seal_blocks` for a quantized pool, as the live path seals), committed, written through to the
CPU tier and flushed; then, `--repeats` times, every block is evicted from the pool and the prompt is served:
its prefix comes back from the CPU tier (the admission's promotion), the last partial block is prefilled and
one token sampled. TTFT is the wall time from submit to the first sampled token (it reads the id back, so the
device work is done). A run counts only if the whole prefix was promoted from the tier. The first repeat pays
one-time costs; the figure is the median of the others. Per arm also: the same request with its prefix still in
the pool (`pool_hit_ttft_ms`: what promotion cannot shed) and the bare copies of the prefix's tier payloads into
pool blocks (`dma_floor_ms`: one DMA per block; `mapped_floor_ms`: one mapped-read kernel). `--variants`
repeats both arms per promotion variant RUN:LOAD[:CHUNK] (blocks per run, 0 for one piece; 'mapped' or 'dma';
the mapped-read kernel's words per program); the first variant is the default's and sets the goal, the others
go under "other_variants".

--quick: a tiny Llama on the CPU (float32), a 256-token prefix; it writes quant_promotion_quick.json where
UAKV_RESULTS_DIR points (benchmarks/results/quick via `make bench`; nothing without it). A full run writes
quant_promotion.json there (benchmarks/results/h200/ for the H200 results).
Goal (H200, 16k-token prefix): fp8 TTFT <= 0.6 x the bf16 promotion.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
from bench_common import emit
from bench_quant_decode import BS, build_model, fill_prefix, sync

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import PROMOTION_RUN
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.kernels.transfer import copy_host_blocks
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

NAME = "quant_promotion"
GOAL = 0.6


def log(msg: str) -> None:
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def evict_pool(cache: KVCacheManager) -> None:
    """Reallocates every free block of the pool, so no cached block is left in it (the tiers keep theirs)."""
    with cache._lock:
        cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))


def serve(loop: StepLoop, prompt: list[int]) -> tuple[float, int]:
    """(seconds from submit to the first sampled token, tokens reused) of one request for one new token."""
    state = SequenceState(prompt=prompt, params=SamplingParams(max_new_tokens=1),
                          text=IncrementalText(lambda ids: ""), eos_token_id=None)
    sync()
    start = time.perf_counter()
    loop.submit(state, lambda item: True)
    while not state.generated:
        loop.step()
    ttft = time.perf_counter() - start
    loop.run_until_idle()
    return ttft, int(state.cached_tokens or 0)


def copy_floors(cache: KVCacheManager, count: int) -> tuple[float | None, float | None]:
    """Seconds of the bare copies of `count` blocks' page-locked tier payloads into pool blocks, best of three:
    one DMA per block (`copy_host_blocks`) and one kernel reading them all (`gather_host_blocks`); what a
    promotion's copies alone take. (None, None) without CUDA."""
    if cache.kv.device.type != "cuda" or cache.lower is None:
        return None, None
    from ultra_adaptive_kv_cache_engine.kernels.triton_host_copy import gather_host_blocks

    tier = cache.lower.store.tiers[0]
    payloads = [r.payload_tensor() for r in tier.get_many(list(tier)[:count])]
    with cache._lock:
        ids = cache.pool.allocate_many(len(payloads))
    rows = cache.kv.view(cache.kv.shape[0], -1).view(torch.uint8)
    addresses = [p.data_ptr() for p in payloads]
    best = [math.inf, math.inf]
    for _ in range(3):
        for i, copy in enumerate((lambda: copy_host_blocks(cache.kv, payloads, ids, wait=True),
                                  lambda: gather_host_blocks(rows, addresses, ids))):
            sync()
            start = time.perf_counter()
            copy()
            sync()
            best[i] = min(best[i], time.perf_counter() - start)
    cache.pool.free(ids)
    return best[0], best[1]


def run_arm(model: PagedLlama, args: argparse.Namespace, fmt: str | None, prompt: list[int],
            warm: list[int]) -> dict[str, Any]:
    s, device = model.shape, model.device
    blocks = 2 * math.ceil((len(prompt) + BS) / BS) + 64
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, device, pool_format=fmt)
    tier_bytes = int(blocks * (spec.bytes_per_block + 4096))
    config = KVCacheConfig(block_size=BS, device=device.type, kv_dtype=fmt, cpu_tier_bytes=tier_bytes,
                           reject_non_finite=False)
    cache = KVCacheManager.from_config(config, spec, default_namespace(config, spec), num_blocks=blocks)
    if cache.lower is None:
        raise RuntimeError("the cache has no CPU tier below the pool")
    sched = SchedulerConfig(max_running=4, max_step_tokens=max(512, 2 * BS), admission_headroom=0.0)
    backend = PagedLlamaBackend(model, cache, sched)
    loop = StepLoop(Scheduler(backend, sched), threaded=False)
    serve(loop, warm)  # compiles the kernels of a prefill over a cached prefix and of sampling
    serve(loop, warm)
    fill_prefix(cache, backend, prompt, torch.Generator(device=device).manual_seed(args.seed))
    cache.lower.flush()
    cache.lower.promotion_run = args.promotion_run or len(prompt)
    cache.lower.mapped_reads = args.mapped_reads
    expected = (len(prompt) - 1) // BS * BS
    runs, promoted = [], []
    for _ in range(args.repeats):
        evict_pool(cache)
        cache.lower.flush()  # blocks written at commit or, when the tiers take them on eviction, just now
        before = cache.stats()["tier_hit_tokens"]
        ttft, cached = serve(loop, prompt)
        promoted.append(cache.stats()["tier_hit_tokens"] - before)
        if cached != expected or promoted[-1] != expected:
            raise RuntimeError(f"{fmt or 'bf16'}: reused {cached} tokens, {promoted[-1]} promoted from the tier; "
                               f"expected {expected}")
        runs.append(ttft)
    pool_hit = min(serve(loop, prompt)[0] for _ in range(2))  # the same request with the prefix in the pool
    dma, mapped = copy_floors(cache, expected // BS)
    moved = expected // BS * spec.bytes_per_block
    steady = runs[1:] or runs
    result = {"kv_dtype": fmt or "none", "runs_ms": [round(t * 1e3, 2) for t in runs],
              "ttft_ms": round(statistics.median(steady) * 1e3, 2), "best_ms": round(min(runs) * 1e3, 2),
              "pool_hit_ttft_ms": round(pool_hit * 1e3, 2),
              "dma_floor_ms": None if dma is None else round(dma * 1e3, 2),
              "mapped_floor_ms": None if mapped is None else round(mapped * 1e3, 2),
              "promoted_tokens": expected, "promoted_bytes": moved, "pool_bytes_per_block": spec.bytes_per_block,
              "promoted_gb_s": round(moved / statistics.median(steady) / 1e9, 2)}
    del loop, backend, cache
    gc.collect()  # the scheduler, backend and cache refer to each other: free the pool and tier before the next
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tokens", type=int, default=16384, help="prompt length (its full blocks are the prefix)")
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--formats", default="fp8")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=f"{PROMOTION_RUN}:mapped",
                   help="comma-separated RUN:LOAD promotion variants, each with its own bf16 arm: RUN blocks looked up "
                        "and loaded per piece (0: all in one piece), LOAD 'mapped' (one kernel reads the page-locked "
                        "payloads) or 'dma' (one copy per block); the first is the default's and sets the goal")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.repeats, args.layers = 256, 2, 2
        torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    args.context, args.steps = args.tokens, 4  # what build_model sizes its positions by
    model = build_model(args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompt = torch.randint(3, model.shape.vocab_size, (args.tokens + 1,), generator=gen).tolist()
    warm = torch.randint(3, model.shape.vocab_size, (4 * BS + 1,), generator=gen).tolist()
    arms, others = [], []
    for i, variant in enumerate(args.variants.split(",")):
        piece, load, *chunk = variant.split(":")
        if load not in ("mapped", "dma") or len(chunk) > 1:
            raise ValueError(f"--variants {variant!r}: RUN:LOAD[:CHUNK] with LOAD 'mapped' or 'dma'")
        args.promotion_run, args.mapped_reads = int(piece), load == "mapped"
        if chunk and device.type == "cuda":  # 16-byte words per program of the mapped-read kernel
            from ultra_adaptive_kv_cache_engine.kernels import triton_host_copy

            triton_host_copy.CHUNK = int(chunk[0])
        found = []
        for fmt in [None, *[f for f in args.formats.split(",") if f]]:
            log(f"arm {fmt or 'bf16'}, promotion {variant}")
            found.append({**run_arm(model, args, fmt, prompt, warm), "promotion_run": int(piece), "load": load,
                          **({"chunk_words": int(chunk[0])} if chunk else {})})
            log(str(found[-1]))
        for arm in found:
            arm["ttft_vs_bf16"] = round(arm["ttft_ms"] / found[0]["ttft_ms"], 3)
        (others if i else arms).extend(found)
    goals = [{"format": a["kv_dtype"], "target_ttft_vs_bf16": GOAL, "value": a["ttft_vs_bf16"],
              "met": a["ttft_vs_bf16"] <= GOAL} for a in arms[1:] if a["kv_dtype"] == "fp8"]
    emit(NAME + ("_quick" if args.quick else ""),
         {"quick": args.quick, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
          "prompt_tokens": len(prompt), "layers": args.layers, "block_size": BS,
          "repeats": args.repeats, "arms": arms, "other_variants": others, "goals": goals}, save=not args.quick or "UAKV_RESULTS_DIR" in os.environ)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
