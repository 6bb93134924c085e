"""The GPU mode of bench_serving.py (`--gpu`): our server under 64 concurrent clients on a Llama-3-8B-shaped model
(random bf16 weights, serving_gpu_model.py), against, in the same run, one after the other on one GPU:
(a) the same engine driven in-process (asyncio consumers of `engine.stream`, no HTTP): what the HTTP and SSE
path costs; (b) our `ModelRunner` running the same prompts as fixed batches of 64; (c) transformers'
`generate_batch`.

Workload: `--gpu-clients` closed-loop clients, each sending `--gpu-rounds` text completions of
`--gpu-prompt-tokens` random ASCII bytes (one token per byte) and `--gpu-new-tokens` new tokens; eos is
disabled everywhere (`BenchCodec`), so every request yields exactly that many tokens, as the fixed batches do.
The HTTP clients run in `--gpu-client-procs` processes (serving_client_procs.py), so that parsing 64 event
streams is not what limits the figure. Output tok/s = all new tokens / wall time (prefills included) for all.
Goals: ours through HTTP >= 0.7x ModelRunner, >= 5x transformers.

The server is a subprocess (`python serving_gpu.py --serve PORT ...`: the model built there, then
`serve_command` with that model); it is stopped before the in-process parts build the model again. Each part
is skipped when too little of `--time-budget-s` is left, and a failing part is reported while the others
run. What the machine lacks (fastapi/uvicorn for the server, `generate_batch` in older transformers) is
named in the JSON. `--dry-run-cpu` runs a tiny random Llama on the CPU through the same code (by default 8
clients, 64-token prompts, 16 new tokens; `--gpu-clients` and the other sizes apply when given).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from serving_gpu_model import BenchCodec, build_model, kv_config, loaded_model, prompts

SERVER_MODULES = ("fastapi", "uvicorn", "starlette", "httpx")
SERVER_VARIANTS: dict[str, dict[str, Any]] = {
    "ours_server_cold": {},
    "ours_server": {},
    "ours_server_pool_only": {"cpu_tier_bytes": 0},
    "ours_server_through": {"tier_writes": "through"},
    "ours_server_deferred_delivery": {"defer_wakeups": True},
}
"""Our server's runs, in this order, each an override of the default config (`KVCacheConfig` fields, and
`defer_wakeups` of the step loop): the default twice, first on the cold machine (in every run of 2026-12-03/04
the first server was the slowest by 20-30%, whatever its config: kernels compiled and cached, host memory
growing; the goals use the second, warm one); the pool alone (no tier); the CPU tier written through at every
commit (`tier_writes="through"`, the default before 2026-12-04: the default now writes a block when the pool
evicts it, and this workload never fills the 16 GiB pool); a step's chunks delivered once the next step is
launched (`StepLoop.defer_wakeups`). (512-token steps, the former default, were measured in the run of
2026-12-03 22:33 UTC: 1,878 output tok/s against 2,004 with 2048.)"""
REPO = Path(__file__).resolve().parent.parent


def sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(clients, prompt tokens, new tokens) of the run."""
    return args.gpu_clients, args.gpu_prompt_tokens, args.gpu_new_tokens


def serve(argv: list[str]) -> int:
    """The server subprocess: `--serve PORT --seed S --init-std X --max-tokens N --block-size B --pool-bytes P
    [--dry-run-cpu]`."""
    import bench_end_to_end_gpu  # noqa: F401 - stands in for the Redis client and xxhash where missing

    p = argparse.ArgumentParser()
    for name in ("--serve", "--seed", "--max-tokens", "--block-size", "--pool-bytes"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--init-std", type=float, required=True)
    p.add_argument("--dry-run-cpu", action="store_true")
    p.add_argument("--variant", choices=sorted(SERVER_VARIANTS), default="ours_server")
    a = p.parse_args(argv)
    from ultra_adaptive_kv_cache_engine.engine.engine import UltraAdaptiveKVCacheEngine
    from ultra_adaptive_kv_cache_engine.server.app import create_app
    from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
    from ultra_adaptive_kv_cache_engine.server.run import run_server

    hf = build_model(a.dry_run_cpu, a.max_tokens, a.seed, a.init_std)
    loaded = loaded_model(hf, a.dry_run_cpu, a.seed, a.init_std)
    server = ServerConfig(host="127.0.0.1", port=a.serve, max_queue=4096, max_tokens_limit=max(4096, a.max_tokens))
    overrides = dict(SERVER_VARIANTS[a.variant])
    defer = overrides.pop("defer_wakeups", None)
    engine = UltraAdaptiveKVCacheEngine(kv_config(hf.device.type, a.block_size, a.pool_bytes, **overrides),
                                        model=loaded)
    try:  # what `uakv serve` does (serve_command), with the step loop's variant set once the model is open
        app = create_app(engine, server, loaded)
        if defer is not None:
            engine._session.steps.defer_wakeups = defer
        run_server(app, server)
    finally:
        engine.close()
    return 0


class Parts:
    """Runs named parts under one deadline; results, errors, skips and seconds by part."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}
        self.seconds: dict[str, float] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, min_s: float, fn: Callable[[], Any]) -> Any:
        if self.left() < min_s:
            self.skipped[name] = f"{self.left():.0f} s left of the time budget; the part needs about {min_s:.0f} s"
            return None
        start = time.monotonic()
        print(f"[serving_gpu {time.strftime('%H:%M:%S')}] {name} ({self.left():.0f} s left)", file=sys.stderr,
              flush=True)
        try:
            self.results[name] = fn()
        except Exception as exc:
            self.errors[name] = f"{type(exc).__name__}: {exc}"[:1500]
            traceback.print_exc(file=sys.stderr)
        self.seconds[name] = round(time.monotonic() - start, 1)
        return self.results.get(name)


def part_server(args: argparse.Namespace, texts: list[str], logs: Path, parts: Parts,
                env: dict[str, str] | None = None, variant: str = "ours_server") -> dict[str, Any]:
    """Our server (a subprocess; its config one of `SERVER_VARIANTS`) under the closed-loop clients
    (`--gpu-client-procs` processes); `env`: extra environment of the server."""
    from serving_client_procs import run_completions_procs
    from serving_servers import ServerProcess, free_port, offline_env
    from serving_stats import summarize

    clients, prompt_tokens, new = sizes(args)
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), "--seed", str(args.seed),
            "--init-std", str(args.init_std), "--max-tokens", str(prompt_tokens + new),
            "--block-size", str(args.gpu_block_size), "--pool-bytes", str(args.gpu_pool_bytes)]
    argv += ["--variant", variant] + (["--dry-run-cpu"] if args.dry_run_cpu else [])
    path = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))
    env = offline_env({"PYTHONPATH": path, **(env or {})})
    procs = args.gpu_client_procs
    with ServerProcess("uakv serve (random Llama)", argv, port, logs / "gpu_server.log", env=env) as server:
        ready = server.wait_ready(max(30.0, min(300.0, parts.left() - 60)))
        model = asyncio.run(_model_id(server.url))
        warm = prompts(clients, prompt_tokens, args.seed + 999)
        run_completions_procs(server.url, model, warm, min(8, new), clients, procs, "warm", "warm", 0)
        records = run_completions_procs(server.url, model, texts, new, clients, procs, "ours", "gpu", 0)
        summary = summarize(records)
        status = server.stop()
    return {"ready_s": round(ready, 1), "exit_status": status, "client_procs": procs,
            "config": SERVER_VARIANTS[variant], **summary}


async def _model_id(url: str) -> str:
    from serving_client import get_model_id

    return await get_model_id(url)


def part_in_process(hf: Any, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The server's engine (same config, same model) driven in this process by closed-loop asyncio consumers of
    `engine.stream`, as the HTTP clients drive the server (a warm-up round first)."""
    from serving_stats import summarize

    from ultra_adaptive_kv_cache_engine.engine.engine import UltraAdaptiveKVCacheEngine

    clients, prompt_tokens, new = sizes(args)
    config = kv_config(hf.device.type, args.gpu_block_size, args.gpu_pool_bytes)
    engine = UltraAdaptiveKVCacheEngine(config, model=loaded_model(hf, args.dry_run_cpu, args.seed, args.init_std))
    try:
        asyncio.run(_consume(engine, prompts(clients, prompt_tokens, args.seed + 999), min(8, new), clients))
        records = asyncio.run(_consume(engine, texts, new, clients))
    finally:
        engine.close()
    return summarize(records)


async def _consume(engine: Any, texts: Sequence[str], new: int, clients: int) -> list[Any]:
    """Client i streams texts i, i + clients, ... in turn (as `run_completions` does over HTTP)."""
    from serving_stats import RequestRecord

    records: list[RequestRecord] = []

    async def loop(i: int, t0: float) -> None:
        for turn, text in enumerate(texts[i::clients]):
            record = RequestRecord("ours_in_process", "gpu", 0, i, turn, 0.0, new)
            records.append(record)
            sent = time.perf_counter()
            record.sent_s = sent - t0
            request = {"text": text, "raw": True, "max_new_tokens": new, "temperature": 0.0}
            async for chunk in engine.stream(request):
                if chunk.text:
                    record.chunk_s.append(time.perf_counter() - sent)
                record.text += chunk.text
                record.prompt_tokens, record.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                record.cached_tokens = chunk.cached_tokens
            record.done_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    await asyncio.gather(*(loop(i, t0) for i in range(clients)))
    return records


def part_runner(hf: Any, ids: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Our ModelRunner over the same prompts, in fixed batches of `clients` (a warm-up batch first)."""
    import torch
    from e2e_model import make_cache
    from model_runner import ModelRunner, RunnerConfig

    from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

    clients, prompt_tokens, new = sizes(args)
    bs = args.gpu_block_size
    model = PagedLlama.from_hf(hf)
    cache, _ = make_cache(model, bs, 2 * clients * (prompt_tokens + new + 2 * bs))
    runner = ModelRunner(model, cache, RunnerConfig(max_context=prompt_tokens + new + bs))
    warm = [[(t * 7 + i) % 250 + 3 for t in range(prompt_tokens)] for i in range(clients)]
    runner.generate(warm, 4)
    tokens, seconds, mode = 0, 0.0, None
    for start in range(0, len(ids), clients):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = runner.generate(ids[start : start + clients], new)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t
        tokens += sum(len(row) for row in out.tokens)
        mode = out.decode_mode.value
    return {"output_tokens": tokens, "seconds": round(seconds, 3), "output_tok_s": round(tokens / seconds, 3),
            "batches": -(-len(ids) // clients), "decode_mode": mode}


def release_memory() -> None:
    """Gives the device memory of the parts that ended back, so the next part can size itself on it."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_parts(args: argparse.Namespace, parts: Parts, missing: list[str]) -> None:
    """Our server first (its subprocess holds the GPU alone), then, on a model built here: our engine in-process,
    ModelRunner, transformers."""
    import tempfile

    from serving_hf import generate_batch

    clients, prompt_tokens, new = sizes(args)
    texts = prompts(clients * args.gpu_rounds, prompt_tokens, args.seed)
    ids = [BenchCodec().encode(t) for t in texts]
    for variant in SERVER_VARIANTS:
        if missing:
            parts.errors[variant] = f"missing Python modules for the server: {', '.join(missing)}"
            continue
        with tempfile.TemporaryDirectory(prefix="uakv-bench-serving-gpu-") as tmp:
            parts.run(variant, 90, functools.partial(part_server, args, texts, Path(tmp), parts, variant=variant))
    hf = parts.run("build_model", 30, lambda: build_model(args.dry_run_cpu, prompt_tokens + new, args.seed,
                                                           args.init_std))
    # On the CPU transformers would size its cache from the free RAM (gigabytes): give it the runner's size.
    cb = {"num_blocks": 8, "max_batch_tokens": 512} if args.dry_run_cpu else None
    if hf is not None:
        parts.run("ours_in_process", 45, lambda: part_in_process(hf, texts, args))
        release_memory()
        parts.run("model_runner", 30, lambda: part_runner(hf, ids, args))
        release_memory()
        parts.run("transformers_generate_batch", 40, lambda: generate_batch(hf, ids[:clients], new, cb))
        parts.results.pop("build_model", None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from bench_end_to_end_gpu import STUBBED
    from serving_stats import goal

    clients, prompt_tokens, new = sizes(args)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        return {"mode": "gpu", "errors": {"setup": "no CUDA device; use --dry-run-cpu to try the code path"}}
    parts = Parts(args.time_budget_s)
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    run_parts(args, parts, missing)
    tok_s = {k: v.get("output_tok_s") for k, v in parts.results.items()}
    ours, runner = tok_s.get("ours_server"), tok_s.get("model_runner")
    ratio = {"ours_over_model_runner": _ratio(ours, runner),
             "ours_over_transformers": _ratio(ours, tok_s.get("transformers_generate_batch")),
             "ours_over_in_process": _ratio(ours, tok_s.get("ours_in_process")),
             "in_process_over_model_runner": _ratio(tok_s.get("ours_in_process"), runner),
             **{f"{v}_over_model_runner": _ratio(tok_s.get(v), runner) for v in SERVER_VARIANTS if v != "ours_server"}}
    return {"mode": "gpu_dry_run_cpu" if args.dry_run_cpu else "gpu",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run_cpu else "cpu",
            "model": "random tiny Llama" if args.dry_run_cpu else "random Llama-3-8B shape, bf16",
            "clients": clients, "prompt_tokens": prompt_tokens, "new_tokens": new, "requests_per_client": args.gpu_rounds,
            "client_procs": args.gpu_client_procs, "block_size": args.gpu_block_size, "pool_bytes": args.gpu_pool_bytes,
            "seed": args.seed, "transformers": transformers.__version__, "missing_modules": missing,
            "stubbed_modules": STUBBED, "ratios": ratio,
            "goals": [goal("output tok/s: our server / ModelRunner fixed batches", ratio["ours_over_model_runner"],
                           ">= 0.7"),
                      goal("output tok/s: our server / transformers generate_batch", ratio["ours_over_transformers"],
                           ">= 5")],
            "results": parts.results, "errors": parts.errors, "skipped": parts.skipped, "seconds": parts.seconds}


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
