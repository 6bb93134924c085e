"""Where the host time of our forwards goes on a GPU (a diagnostic, not a goal): Llama-3-8B shape, bf16, random
weights, seeded; CUDA only (it measures launches and syncs, which the CPU does not have). Prints one JSON line and
writes it to `results/e2e_probe.json` (or to $UAKV_RESULTS_DIR; the H200 run is `results/h200/e2e_probe.json`).

(a) decode step time (CUDA graph replays, events, median of 30) at batch 1 and 64, the fused decode ops
    ("triton": `kernels.fused_decode_ops`) vs the PyTorch formulas ("torch"), same weights, same run (the
    variants in detail, with end-to-end rates and the products alone: e2e_decode_ab.py);
(b) host enqueue time vs time to result of eager forwards (decode batch 1, prefill of 512 tokens, 64 tokens over
    a 4k cached prefix), and the top host ops of each (torch.profiler, self CPU time);
(c) the host synchronisations (torch.cuda sync debug mode) of a promoted prefill and of the serving engine's steps
    (the default config: CPU tier written through), each with the stack that made it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
import traceback
import warnings
from typing import Any

import bench_end_to_end_gpu  # noqa: F401 - stands in for missing optional modules
import torch
from bench_common import emit
from e2e_model import build_hf, make_cache, sync
from model_runner import ModelRunner, RunnerConfig

from ultra_adaptive_kv_cache_engine.model.decode_step import DecodeStep
from ultra_adaptive_kv_cache_engine.model.paged_llama import DecodeInputs, PagedLlama


def graph_step_ms(model: PagedLlama, pool: torch.Tensor, batch: int, ctx: int, bs: int, ops: str) -> dict[str, Any]:
    width = ctx // bs + 2
    step = DecodeStep(model.with_decode_ops(ops), pool, batch, width)
    tables = torch.arange(batch * width, dtype=torch.int32).reshape(batch, width) % pool.shape[0]
    step.load([5] * batch, [ctx] * batch, tables)
    ok = step.capture()
    times = []
    for _ in range(30):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step.run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    ms = statistics.median(times)
    return {"captured": ok, "error": step.capture_error, "step_ms": round(ms, 3), "tok_s": round(batch * 1e3 / ms, 1)}


def host_profile(fn: Any, label: str) -> dict[str, Any]:
    fn()
    sync()
    enq, tot = [], []
    for _ in range(3):
        sync()
        t = time.perf_counter()
        fn()
        enq.append(time.perf_counter() - t)
        sync()
        tot.append(time.perf_counter() - t)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
        sync()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:25]
    top = [{"op": e.key[:60], "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3)} for e in rows]
    return {"what": label, "enqueue_ms": round(min(enq) * 1e3, 2), "result_ms": round(min(tot) * 1e3, 2), "top": top}


class SyncLog:
    """Collects the sync-debug warnings with the Python stack that raised each (deduplicated)."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def __enter__(self) -> SyncLog:
        self._old = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
            stack = "".join(traceback.format_stack(limit=9)[:-1])
            key = f"{str(message)[:120]}\n{stack}"
            self.seen[key] = self.seen.get(key, 0) + 1

        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = self._old

    def report(self) -> list[dict[str, Any]]:
        return [{"count": n, "where": k[-1500:]} for k, n in sorted(self.seen.items(), key=lambda kv: -kv[1])[:12]]


def serving_syncs(hf: Any) -> dict[str, Any]:
    from serving_gpu_model import kv_config, loaded_model, prompts

    from ultra_adaptive_kv_cache_engine.engine.engine import UltraAdaptiveKVCacheEngine

    engine = UltraAdaptiveKVCacheEngine(kv_config("cuda", 16, 4 * 2**30), model=loaded_model(hf, False, 0, 0.02))

    async def run(texts: list[str], new: int) -> None:
        async def one(text: str) -> None:
            async for _ in engine.stream({"text": text, "raw": True, "max_new_tokens": new, "temperature": 0.0}):
                pass

        await asyncio.gather(*(one(t) for t in texts))

    try:
        asyncio.run(run(prompts(8, 64, 7), 20))  # warm: graphs captured, kernels compiled
        with SyncLog() as log:
            t = time.perf_counter()
            asyncio.run(run(prompts(16, 100, 8), 40))
            seconds = time.perf_counter() - t
        return {"seconds": round(seconds, 2), "syncs": log.report()}
    finally:
        engine.close()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", default="a,b,c")
    args_in = p.parse_args()
    parts = set(args_in.parts.split(","))
    torch.manual_seed(0)
    spec = argparse.Namespace(quick=False, prompt_tokens=8192, seed=0, init_std=0.02)
    hf = build_hf(spec, torch.device("cuda"), torch.bfloat16)
    model = PagedLlama.from_hf(hf)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    bs = 16
    cache, tiers = make_cache(model, bs, 64 * 700 + 8192 + 64 * bs, tier_tokens=4096 + 8 * bs)
    pool = cache.kv
    if "a" in parts:
        for batch in (1, 64):
            for ops in ("triton", "torch"):
                key = f"a_decode_b{batch}_{ops}_ops"
                try:
                    out[key] = graph_step_ms(model, pool, batch, 512, bs, ops)
                except Exception as exc:
                    out[key] = f"{type(exc).__name__}: {exc}"[:400]
                print(key, out[key], file=sys.stderr, flush=True)
    if "b" in parts:
        inputs = DecodeInputs(torch.tensor([7], device="cuda"), torch.tensor([512], device="cuda"),
                              torch.arange(40, dtype=torch.int32, device="cuda")[None])
        out["b_decode_b1_eager"] = host_profile(lambda: model.decode(pool, inputs), "decode batch 1 eager")
        ids = torch.randint(3, 1000, (512,), device="cuda")
        table = torch.arange(300, dtype=torch.int32, device="cuda")
        out["b_prefill_512"] = host_profile(lambda: model.prefill(pool, ids, 0, table), "prefill 512 from 0")
        ids64 = ids[:64]
        out["b_prefill_64_over_4k"] = host_profile(lambda: model.prefill(pool, ids64, 4096, table),
                                                   "prefill 64 over 4096 cached (default path)")
        for k in ("b_decode_b1_eager", "b_prefill_512", "b_prefill_64_over_4k"):
            print(k, json.dumps(out[k])[:1500], file=sys.stderr, flush=True)
    if "c" in parts:
        runner = ModelRunner(model, cache, RunnerConfig(max_context=4096 + 4 * bs, cuda_graphs=False))
        prompt = torch.randint(3, 1000, (4096,)).tolist()
        runner.generate([prompt], 1)
        tiers.flush()
        with cache._lock:
            cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))
        with SyncLog() as log:
            res = runner.generate([prompt], 1)
        out["c_promoted_prefill"] = {"cached": res.cached_tokens[0], "ttft_ms": round(res.ttft_s[0] * 1e3, 2),
                                     "syncs": log.report()}
        del runner, cache, pool
        torch.cuda.empty_cache()
        try:
            out["c_serving"] = serving_syncs(hf)
        except Exception as exc:
            out["c_serving"] = f"{type(exc).__name__}: {exc}"[:800]
            traceback.print_exc()
    emit("e2e_probe", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
