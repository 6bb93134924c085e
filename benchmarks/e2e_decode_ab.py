"""Batch-1 decode on a Llama-3-8B-shaped model (random bf16 weights, seeded): the decode ops, A/B in one run.

The decode step's layers run through `kernels.fused_decode_ops`; this compares, same weights, same run:
- "torch": the PyTorch formulas (the path before the fused ops: 16 launches a layer at batch 1);
- "triton_cublas": RoPE + KV store in one Triton launch, SiLU-multiply in one, cuBLAS products;
- "triton" (the default on CUDA): as "triton_cublas", and at batch 1 Triton matrix-vector kernels with the
  norms, the SiLU-multiply and the residual adds fused in.
Parts (`--parts`): check (logits of one step vs "torch": relative error, same argmax), graph (CUDA-graph step
time, events, median of 50 replays, batch 1 and 64, 512-token context, the variants interleaved over 2 rounds),
runner (end to end through `ModelRunner.generate`, CUDA graphs, 512-token prompt, 128 new tokens, as
bench_end_to_end_gpu part d counts it), gemv (each product shape alone: cuBLAS vs the Triton kernel, GB/s, weights
rotated past the L2), profile (torch.profiler: the top kernels of one batch-1 graph replay per variant).
Prints one JSON line; writes results/e2e_decode_ab.json (or under $UAKV_RESULTS_DIR). CUDA only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import bench_end_to_end_gpu  # noqa: F401 - stands in for missing optional modules
import torch
import torch.nn.functional as F
from bench_common import emit
from e2e_model import build_hf, log, make_cache
from model_runner import ModelRunner, RunnerConfig

from ultra_adaptive_kv_cache_engine.model.decode_step import DecodeStep
from ultra_adaptive_kv_cache_engine.model.paged_llama import DecodeInputs, PagedLlama

VARIANTS = ("torch", "triton_cublas", "triton")
BS = 16


def step_for(model: PagedLlama, pool: torch.Tensor, batch: int, ctx: int) -> DecodeStep:
    width = ctx // BS + 2
    step = DecodeStep(model, pool, batch, width)
    tables = torch.arange(batch * width, dtype=torch.int32).reshape(batch, width) % pool.shape[0]
    step.load([5] * batch, [ctx] * batch, tables)
    if not step.capture():
        raise RuntimeError(f"capture failed: {step.capture_error}")
    return step


def replay_ms(step: DecodeStep, n: int) -> float:
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step.run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def part_check(models: dict[str, PagedLlama], pool: torch.Tensor) -> dict[str, Any]:
    inputs = DecodeInputs(torch.tensor([7], device="cuda"), torch.tensor([512], device="cuda"),
                          torch.arange(40, dtype=torch.int32, device="cuda")[None])
    ref = models["torch"].decode(pool, inputs)
    out = {}
    for name in VARIANTS[1:]:
        got = models[name].decode(pool, inputs)
        rel = float((got.double() - ref.double()).norm() / ref.double().norm())
        out[name] = {"rel_err_vs_torch": round(rel, 6), "same_argmax": bool(got.argmax() == ref.argmax())}
    return out


def part_graph(models: dict[str, PagedLlama], pool: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in (1, 64):
        steps = {name: step_for(m, pool, batch, 512) for name, m in models.items()}
        runs: dict[str, list[float]] = {name: [] for name in models}
        for order in (VARIANTS, VARIANTS[::-1]):
            for name in order:
                runs[name].append(replay_ms(steps[name], 50))
        for name, ms in runs.items():
            best = statistics.median(ms)
            out[f"b{batch}_{name}"] = {"step_ms": round(best, 4), "rounds_ms": [round(x, 4) for x in ms],
                                       "tok_s": round(batch * 1e3 / best, 1)}
        base = statistics.median(runs["torch"])
        for name in VARIANTS[1:]:
            out[f"b{batch}_{name}"]["speedup_vs_torch"] = round(base / statistics.median(runs[name]), 4)
        del steps
    return out


def part_runner(models: dict[str, PagedLlama], new_tokens: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    out: dict[str, Any] = {}
    for name in (*VARIANTS, *VARIANTS[::-1]):
        model = models[name]
        cache, _ = make_cache(model, 64, 4 * (512 + new_tokens + 64))
        runner = ModelRunner(model, cache, RunnerConfig(max_context=512 + new_tokens + 64))
        prompt = torch.randint(3, model.shape.vocab_size, (512,), generator=gen).tolist()
        runner.generate([prompt], 4)  # captures the graph, compiles
        prompt = torch.randint(3, model.shape.vocab_size, (512,), generator=gen).tolist()
        res = runner.generate([prompt], new_tokens)
        out.setdefault(name, []).append({"tok_s": round(res.decode_tokens_per_s, 2), "mode": res.decode_mode.value,
                                         "graph_error": res.graph_error})
        del runner, cache
    for name in VARIANTS:
        out[name + "_best_tok_s"] = max(r["tok_s"] for r in out[name])
    return out


def part_gemv() -> dict[str, Any]:
    from ultra_adaptive_kv_cache_engine.kernels.triton_fused_gemv import Prologue, triton_gemv

    shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
              "lm_head": (128256, 4096)}
    out: dict[str, Any] = {}
    for label, (n, k) in shapes.items():
        copies = max(1, -(-(512 << 20) // (n * k * 2)))  # at least 512 MiB of weights: every read misses the L2
        ws = [torch.randn((n, k), device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn((1, k), device="cuda", dtype=torch.bfloat16)
        triton_gemv(x, ws[0], Prologue.NONE)  # tunes
        row: dict[str, Any] = {}
        impls = (("cublas", lambda w, x=x: F.linear(x, w)),
                 ("triton", lambda w, x=x: triton_gemv(x, w, Prologue.NONE)))
        for impl, fn in impls:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for w in ws * max(1, 8 // copies):
                    fn(w)
            calls = len(ws) * max(1, 8 // copies)
            graph.replay()
            ms = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                graph.replay()
                b.record()
                b.synchronize()
                ms.append(a.elapsed_time(b) / calls)
            t = statistics.median(ms)
            row[impl] = {"us": round(t * 1e3, 2), "gb_s": round(n * k * 2 / (t * 1e-3) / 1e9, 1)}
        row["triton_vs_cublas"] = round(row["cublas"]["us"] / row["triton"]["us"], 3)
        out[label] = row
        del ws
        torch.cuda.empty_cache()
    return out


def part_profile(models: dict[str, PagedLlama], pool: torch.Tensor) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    out: dict[str, Any] = {}
    for name in ("torch", "triton"):
        step = step_for(models[name], pool, 1, 512)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step.run()
            torch.cuda.synchronize()
        rows = [e for e in prof.key_averages() if e.device_time_total > 0]
        rows.sort(key=lambda e: e.device_time_total, reverse=True)
        out[name] = {"kernels": sum(e.count for e in rows),
                     "device_ms": round(sum(e.device_time_total for e in rows) / 1e3, 3),
                     "top": [{"kernel": e.key[:70], "calls": e.count, "us": round(e.device_time_total, 1)}
                             for e in rows[:14]]}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="check,graph,runner,gemv,profile")
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    parts = [x for x in args.parts.split(",") if x]
    torch.manual_seed(0)
    spec = argparse.Namespace(quick=False, prompt_tokens=2048, seed=0, init_std=0.02)
    hf = build_hf(spec, torch.device("cuda"), torch.bfloat16)
    base = PagedLlama.from_hf(hf)
    models = {name: base.with_decode_ops(name) for name in VARIANTS}
    cache, _ = make_cache(base, BS, 64 * 560 + 64 * BS)
    cache.kv.normal_(0.0, 1.0, generator=torch.Generator(device="cuda").manual_seed(1))  # attended KV: no zeros
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                           "variants": list(VARIANTS), "results": {}, "errors": {}, "seconds": {}}
    jobs = {"check": lambda: part_check(models, cache.kv), "graph": lambda: part_graph(models, cache.kv),
            "runner": lambda: part_runner(models, args.new_tokens), "gemv": part_gemv,
            "profile": lambda: part_profile(models, cache.kv)}
    for part in parts:
        start = time.monotonic()
        try:
            out["results"][part] = jobs[part]()
        except Exception as exc:  # report the part's failure, keep going with the others
            out["errors"][part] = f"{type(exc).__name__}: {exc}"[:800]
        out["seconds"][part] = round(time.monotonic() - start, 1)
        log(f"{part} ({out['seconds'][part]} s): {str(out['results'].get(part, out['errors'].get(part)))[:1500]}")
    emit("e2e_decode_ab", out)
    return 1 if out["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
