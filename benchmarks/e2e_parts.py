"""The timed parts of bench_end_to_end_gpu.py, each over one shared `World`: (a) uncached TTFT, (b) TTFT of a
GPU-pool hit, (c) TTFT of a CPU-tier hit, (d) decode rate; each returns its figures as a JSON-ready dict.

Invariants: the baselines (transformers, the staged load, the pinned copy) run in the same process on the same
weights; a baseline's failure is noted under its own key (`guarded`) and never hides our figures; a part raises
RuntimeError when the cache did not reuse or promote exactly the tokens it expected.
Import it after the script's `stub_missing_modules()` (the package imports the Redis client and xxhash).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
from e2e_model import World, sync
from model_runner import ModelRunner

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.model.gathered_prefill import PrefillPath
from ultra_adaptive_kv_cache_engine.tiers.block_io import LoadResult


def timed_ttft(runner: ModelRunner, prompt: list[int]) -> tuple[float, int]:
    sync()
    out = runner.generate([prompt], 1)
    return out.ttft_s[0], out.cached_tokens[0]


def hf_forward_s(hf: Any, prompt: list[int], device: torch.device) -> float:
    ids = torch.tensor([prompt], device=device)
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        hf(ids, use_cache=False, logits_to_keep=1)
    sync()
    return time.perf_counter() - start


def guarded(what: str, fn: Callable[[], Any], errors: dict[str, str]) -> Any:
    """fn(), or None with its error noted under `what` (a baseline's failure must not hide our figures)."""
    try:
        return fn()
    except Exception as exc:
        errors[what] = f"{type(exc).__name__}: {exc}"[:400]
        traceback.print_exc(file=sys.stderr)
        return None


def part_uncached(w: World, args: argparse.Namespace) -> dict[str, Any]:
    ours: list[float] = []
    hf: list[float] = []
    errors: dict[str, str] = {}
    for _ in range(2):  # two different prompts: the second is the one (b) and (c) reuse
        prompt = w.prompt(args.prompt_tokens)
        ttft, cached = timed_ttft(w.ttft_runner, prompt)
        if cached:
            raise RuntimeError(f"a fresh random prompt hit {cached} cached tokens")
        w.last_prompt = prompt
        ours.append(ttft)
        w.tiers.flush()  # the write-through (a background thread) is done before anything else is timed
        seconds = guarded("hf_forward", lambda p=prompt: hf_forward_s(w.hf, p, w.device), errors)
        if seconds is not None:
            hf.append(seconds)
    out: dict[str, Any] = {"ours_ms": [round(s * 1e3, 2) for s in ours], "ttft_ms": round(min(ours) * 1e3, 2),
                           "hf_forward_ms": [round(s * 1e3, 2) for s in hf], **errors}
    if hf:
        out["hf_ms"] = round(min(hf) * 1e3, 2)
        out["ours_vs_hf_forward"] = round(min(hf) / min(ours), 3)
    return out


def part_gpu_hit(w: World, args: argparse.Namespace) -> dict[str, Any]:
    """Three hits per path, the default path's first (it may pay a one-time cost), then the prefill alone."""
    prompt = w.last_prompt
    expected = (len(prompt) - 1) // args.block_size * args.block_size
    out: dict[str, Any] = {"cached_tokens": expected, "computed_tokens": len(prompt) - expected,
                           "default_path": w.model.gather_rule.choose(len(prompt) - expected, expected).value}
    for label, runner in (("", w.ttft_runner), ("kernel_", w.kernel_runner)):
        runs = [timed_ttft(runner, prompt) for _ in range(3)]
        if any(cached != expected for _, cached in runs):
            raise RuntimeError(f"pool hit reused {[c for _, c in runs]} tokens; expected {expected}")
        out[f"{label}ttft_ms"] = round(min(t for t, _ in runs) * 1e3, 2)
        out[f"{label}runs_ms"] = [round(t * 1e3, 2) for t, _ in runs]
    out["kernel_vs_default"] = round(out["kernel_ttft_ms"] / out["ttft_ms"], 3)
    for path in PrefillPath:
        enqueue_s, total_s = prefill_alone_s(w, prompt, path)
        out[f"prefill_{path.value}_enqueue_ms"] = round(enqueue_s * 1e3, 2)
        out[f"prefill_{path.value}_ms"] = round(total_s * 1e3, 2)
    return out


def prefill_alone_s(w: World, prompt: list[int], path: PrefillPath) -> tuple[float, float]:
    """The hit's `PagedLlama.prefill` alone over the opened sequence (the runner's own row setup), best of 3:
    (seconds until it returns, with nothing synced inside; seconds until its logits are ready)."""
    row = w.ttft_runner._open(prompt, 1)
    try:
        ids = torch.tensor(prompt[row.cached :], device=w.device)
        table = torch.tensor(row.table, dtype=torch.int32, device=w.device)
        best = (math.inf, math.inf)
        for _ in range(3):
            sync()
            start = time.perf_counter()
            w.model.prefill(w.ttft_cache.pool.kv, ids, row.cached, table, path)
            enqueued = time.perf_counter() - start
            sync()
            best = min(best, (enqueued, time.perf_counter() - start), key=lambda x: x[1])
        return best
    finally:
        w.ttft_runner._release(row)


def evict_pool(cache: KVCacheManager) -> None:
    """Reallocate every free block of the pool, so no cached block is left in it (the tiers keep theirs)."""
    with cache._lock:
        cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))


def promoted_ttft(w: World, prompt: list[int], expected: int) -> tuple[float, float, LoadResult]:
    """TTFT of `prompt` after evicting the pool, so that its cached prefix comes from the CPU tier; with the
    load's own time and how it moved the blocks. RuntimeError unless exactly `expected` tokens were promoted."""
    w.tiers.flush()  # no write-through in flight while timing
    evict_pool(w.ttft_cache)
    before = w.ttft_cache.stats()["tier_hit_tokens"]
    w.tiers.loads.clear()
    ttft, cached = timed_ttft(w.ttft_runner, prompt)
    promoted = w.ttft_cache.stats()["tier_hit_tokens"] - before
    if cached != expected or promoted != expected or len(w.tiers.loads) != 1:
        raise RuntimeError(f"reused {cached} tokens, {promoted} promoted in {len(w.tiers.loads)} loads; "
                           f"expected {expected} from the tier in one load")
    timer, result = w.tiers.loads[0]
    return ttft, timer.seconds, result


def pinned_copy_s(nbytes: int, device: torch.device) -> float | None:
    """The link's ceiling: the best of two host-to-device copies of `nbytes` from one page-locked buffer."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = math.inf
    for _ in range(2):
        sync()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        sync()
        best = min(best, time.perf_counter() - start)
    del host, dev
    return best


def part_cpu_tier(w: World, args: argparse.Namespace) -> dict[str, Any]:
    """The cache's own promotion (3 runs: the first pays any one-time cost), then the former staged load (2)."""
    prompt = w.last_prompt
    expected = (len(prompt) - 1) // args.block_size * args.block_size
    blocks = expected // args.block_size
    nbytes = blocks * w.ttft_cache.spec.bytes_per_block
    out: dict[str, Any] = {"cached_tokens": expected, "promoted_bytes": nbytes}
    runs = [promoted_ttft(w, prompt, expected) for _ in range(3)]
    direct = [r.direct for _, _, r in runs]
    out.update(runs_ms=[round(t * 1e3, 2) for t, _, _ in runs], load_ms=[round(s * 1e3, 2) for _, s, _ in runs],
               direct_blocks=direct, ttft_ms=round(min(t for t, _, _ in runs) * 1e3, 2))
    load_s = min(s for _, s, _ in runs)
    out["load_gb_s"] = round(nbytes / load_s / 1e9, 2)
    out["ttft_minus_load_ms"] = round(min(t - s for t, s, _ in runs) * 1e3, 2)  # compare with b's GPU-hit TTFT
    if w.device.type == "cuda" and any(d != blocks for d in direct):
        out["path_error"] = f"the cache loaded {direct} of {blocks} blocks by direct copies; the rest were decoded"
    errors: dict[str, str] = {}  # a reference's failure must not hide the figures above
    staged = guarded("staged_error", lambda: staged_runs(w, prompt, expected), errors)
    if staged is not None:
        out.update(staged_runs_ms=[round(t * 1e3, 2) for t, _, _ in staged],
                   staged_load_ms=[round(s * 1e3, 2) for _, s, _ in staged],
                   staged_ttft_ms=round(min(t for t, _, _ in staged) * 1e3, 2))
    ceiling = guarded("pinned_copy_error", lambda: pinned_copy_s(nbytes, w.device), errors)
    if ceiling is not None:
        out.update(pinned_copy_ms=round(ceiling * 1e3, 2), pinned_copy_gb_s=round(nbytes / ceiling / 1e9, 2),
                   load_vs_pinned_copy=round(load_s / ceiling, 3))
    return {**out, **errors}


def staged_runs(w: World, prompt: list[int], expected: int) -> list[tuple[float, float, LoadResult]]:
    """Two promotions through the former staged load (the reference)."""
    w.tiers.staged = True
    try:
        return [promoted_ttft(w, prompt, expected) for _ in range(2)]
    finally:
        w.tiers.staged = False


def hf_generate_s(hf: Any, ids: torch.Tensor, new: int) -> float:
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
    sync()
    if out.shape[1] != ids.shape[1] + new:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens; expected {new}")
    return time.perf_counter() - start


def hf_decode(w: World, prompts: list[list[int]], new: int, budget_s: float) -> dict[str, Any]:
    """transformers' decode rate: (generate(n) - generate(1)) over n - 1 steps, n sized to fit `budget_s`."""
    ids = torch.tensor(prompts, device=w.device)
    hf_generate_s(w.hf, ids, 1)  # warm-up
    first = min(hf_generate_s(w.hf, ids, 1) for _ in range(2))
    probe = min(new, 8)
    per_step = max((hf_generate_s(w.hf, ids, probe) - first) / max(1, probe - 1), 1e-4)
    steps = max(probe, min(new, int(budget_s / per_step)))
    total = hf_generate_s(w.hf, ids, steps)
    rate = len(prompts) * (steps - 1) / max(total - first, 1e-9)
    return {"tok_s": round(rate, 2), "new_tokens": steps, "first_token_ms": round(first * 1e3, 2)}


def part_decode(w: World, args: argparse.Namespace, batch: int) -> dict[str, Any]:
    warm = w.runner.generate([w.prompt(args.decode_prompt) for _ in range(batch)], 4)  # captures the graph
    prompts = [w.prompt(args.decode_prompt) for _ in range(batch)]
    ours = w.runner.generate(prompts, args.new_tokens)
    out: dict[str, Any] = {
        "ours_tok_s": round(ours.decode_tokens_per_s, 2), "mode": ours.decode_mode.value,
        "graph_error": warm.graph_error or ours.graph_error, "new_tokens": args.new_tokens,
    }
    errors: dict[str, str] = {}
    eager = guarded("eager_error", lambda: w.eager_runner.generate(prompts, min(args.new_tokens, 32)), errors)
    if eager is not None:
        out["eager_tok_s"] = round(eager.decode_tokens_per_s, 2)
        out["graph_vs_eager"] = round(ours.decode_tokens_per_s / eager.decode_tokens_per_s, 2)
    hf = guarded("hf_error", lambda: hf_decode(w, prompts, args.new_tokens, args.hf_budget_s), errors)
    if hf is not None:
        out.update(hf_tok_s=hf["tok_s"], hf_new_tokens=hf["new_tokens"],
                   speedup_vs_hf=round(ours.decode_tokens_per_s / hf["tok_s"], 2) if hf["tok_s"] else None)
    if batch == 1:
        hf_tokens = guarded("hf_tokens_error", lambda: hf_greedy(w, prompts[0], 16), errors)
        if hf_tokens is not None:
            pairs = list(zip(ours.tokens[0], hf_tokens, strict=False))
            out["tokens_equal_hf_greedy_first_n"] = next((i for i, (a, b) in enumerate(pairs) if a != b), len(pairs))
    return {**out, **errors}


def hf_greedy(w: World, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt], device=w.device)
    with torch.no_grad():
        out = w.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                            pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()
