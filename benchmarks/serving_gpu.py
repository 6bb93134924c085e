"""The GPU mode of bench_serving.py (`--gpu`): our server under 64 concurrent clients on a Llama-3-8B-shaped model
(random bf16 weights, e2e_model.build_hf), against (a) our `ModelRunner` running the same prompts as fixed
batches of 64 and (b) transformers' `generate_batch`, in the same run, one after the other on one GPU.

Workload: `--gpu-clients` closed-loop clients, each sending `--gpu-rounds` text completions of
`--gpu-prompt-tokens` random ASCII bytes (one token per byte) and `--gpu-new-tokens` new tokens; eos is
disabled everywhere (`BenchCodec`), so every request yields exactly that many tokens, as the fixed batches do.
Output tok/s = all new tokens / wall time (prefills included) for all three. Goals: ours >= 0.7x ModelRunner,
>= 5x transformers.

The server is a subprocess (`python serving_gpu.py --serve PORT ...`: the model built there, then
`serve_command` with that model); it is stopped before the in-process parts build the model again. Each part
is skipped when too little of `--time-budget-s` is left, and a failing part is reported while the others
run. What the machine lacks (fastapi/uvicorn for the server, `generate_batch` in older transformers) is
named in the JSON. `--dry-run-cpu` runs a tiny random Llama on the CPU through the same code (8 clients,
64-token prompts, 16 new tokens).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import random
import string
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SERVER_MODULES = ("fastapi", "uvicorn", "starlette", "httpx")
REPO = Path(__file__).resolve().parent.parent


class BenchCodec:
    """The tiny Llama's byte codec with no eos, decoding every token to one character (so each decode step
    streams one chunk): bytes as bytes, other ids as a CJK ideograph."""

    def __init__(self) -> None:
        from ultra_adaptive_kv_cache_engine.model.text import ByteTextCodec

        self.bytes = ByteTextCodec()
        self.pad_token_id = self.bytes.pad_token_id
        self.identity = self.bytes.identity + "-bench-no-eos"
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self.bytes.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(0x4E00 + i % 0x5000) for i in token_ids)

    def chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        return self.bytes.chat(messages, add_generation_prompt)


def sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(clients, prompt tokens, new tokens) of the run."""
    if args.dry_run_cpu:
        return 8, 64, 16
    return args.gpu_clients, args.gpu_prompt_tokens, args.gpu_new_tokens


def build_model(dry_run: bool, max_tokens: int, seed: int, init_std: float) -> Any:
    """The seeded random LlamaForCausalLM (Llama-3-8B shape, bf16 on CUDA; tiny, float32 on the CPU)."""
    import torch
    from e2e_model import build_hf

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    spec = argparse.Namespace(quick=dry_run, prompt_tokens=max_tokens, seed=seed, init_std=init_std)
    return build_hf(spec, device, dtype)


def prompts(n: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " "
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]


def serve(argv: list[str]) -> int:
    """The server subprocess: `--serve PORT --seed S --init-std X --max-tokens N --block-size B --pool-bytes P
    [--dry-run-cpu]`."""
    import bench_end_to_end_gpu  # noqa: F401 - stands in for the Redis client and xxhash where missing

    p = argparse.ArgumentParser()
    for name in ("--serve", "--seed", "--max-tokens", "--block-size", "--pool-bytes"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--init-std", type=float, required=True)
    p.add_argument("--dry-run-cpu", action="store_true")
    a = p.parse_args(argv)
    from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
    from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
    from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
    from ultra_adaptive_kv_cache_engine.server.run import serve_command

    hf = build_model(a.dry_run_cpu, a.max_tokens, a.seed, a.init_std)
    shape = "tiny" if a.dry_run_cpu else "llama3-8b-shape"
    loaded = LoadedModel(model=hf, tokenizer=BenchCodec(), model_id=f"random-{shape}",
                         weights_fingerprint=f"random-{shape}-seed{a.seed}-std{a.init_std}", dtype=hf.dtype,
                         device=hf.device, max_context=int(hf.config.max_position_embeddings))
    config = KVCacheConfig(device=hf.device.type, block_size=a.block_size, max_memory=a.pool_bytes,
                           reject_non_finite=False)
    server = ServerConfig(host="127.0.0.1", port=a.serve, max_queue=4096, max_tokens_limit=max(4096, a.max_tokens))
    return serve_command(config, server, model=loaded)


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


def part_server(args: argparse.Namespace, texts: list[str], logs: Path, parts: Parts) -> dict[str, Any]:
    from serving_client import run_completions
    from serving_servers import ServerProcess, free_port, offline_env
    from serving_stats import summarize

    clients, prompt_tokens, new = sizes(args)
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port), "--seed", str(args.seed),
            "--init-std", str(args.init_std), "--max-tokens", str(prompt_tokens + new),
            "--block-size", str(args.gpu_block_size), "--pool-bytes", str(args.gpu_pool_bytes)]
    argv += ["--dry-run-cpu"] if args.dry_run_cpu else []
    env = offline_env({"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))})
    with ServerProcess("uakv serve (random Llama)", argv, port, logs / "gpu_server.log", env=env) as server:
        ready = server.wait_ready(max(30.0, min(300.0, parts.left() - 60)))
        model = asyncio.run(_model_id(server.url))
        warm = prompts(clients, prompt_tokens, args.seed + 999)
        asyncio.run(run_completions(server.url, model, warm, min(8, new), clients, "warm", "warm", 0))
        records = asyncio.run(run_completions(server.url, model, texts, new, clients, "ours", "gpu", 0))
        summary = summarize(records)
        status = server.stop()
    return {"ready_s": round(ready, 1), "exit_status": status, **summary}


async def _model_id(url: str) -> str:
    from serving_client import get_model_id

    return await get_model_id(url)


def part_runner(hf: Any, ids: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    """Our ModelRunner over the same prompts, in fixed batches of `clients` (a warm-up batch first)."""
    import torch
    from e2e_model import make_cache

    from ultra_adaptive_kv_cache_engine.engine.model_runner import ModelRunner, RunnerConfig
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


def run_gpu(args: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import torch
    from bench_end_to_end_gpu import STUBBED
    from serving_hf import generate_batch
    from serving_stats import goal

    clients, prompt_tokens, new = sizes(args)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        return {"mode": "gpu", "errors": {"setup": "no CUDA device; use --dry-run-cpu to try the code path"}}
    parts = Parts(args.time_budget_s)
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    texts = prompts(clients * args.gpu_rounds, prompt_tokens, args.seed)
    ids = [BenchCodec().encode(t) for t in texts]
    with tempfile.TemporaryDirectory(prefix="uakv-bench-serving-gpu-") as tmp:
        if missing:
            parts.errors["ours_server"] = f"missing Python modules for the server: {', '.join(missing)}"
        else:
            parts.run("ours_server", 120, lambda: part_server(args, texts, Path(tmp), parts))
    hf = parts.run("build_model", 30, lambda: build_model(args.dry_run_cpu, prompt_tokens + new, args.seed,
                                                           args.init_std))
    # On the CPU transformers would size its cache from the free RAM (gigabytes): give it the runner's size.
    cb = {"num_blocks": 8, "max_batch_tokens": 512} if args.dry_run_cpu else None
    if hf is not None:
        parts.run("model_runner", 30, lambda: part_runner(hf, ids, args))
        release_memory()
        parts.run("transformers_generate_batch", 40, lambda: generate_batch(hf, ids[:clients], new, cb))
        parts.results.pop("build_model", None)
    r = parts.results
    ours = r.get("ours_server", {}).get("output_tok_s")
    runner = r.get("model_runner", {}).get("output_tok_s")
    hf_tok_s = r.get("transformers_generate_batch", {}).get("output_tok_s")
    ratio = {"ours_over_model_runner": round(ours / runner, 4) if ours and runner else None,
             "ours_over_transformers": round(ours / hf_tok_s, 4) if ours and hf_tok_s else None}
    import transformers

    return {"mode": "gpu_dry_run_cpu" if args.dry_run_cpu else "gpu",
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.dry_run_cpu else "cpu",
            "model": "random tiny Llama" if args.dry_run_cpu else "random Llama-3-8B shape, bf16",
            "clients": clients, "prompt_tokens": prompt_tokens, "new_tokens": new, "requests_per_client": args.gpu_rounds,
            "block_size": args.gpu_block_size, "pool_bytes": args.gpu_pool_bytes, "seed": args.seed,
            "transformers": transformers.__version__, "missing_modules": missing, "stubbed_modules": STUBBED,
            "ratios": ratio,
            "goals": [goal("output tok/s: our server / ModelRunner fixed batches", ratio["ours_over_model_runner"],
                           ">= 0.7"),
                      goal("output tok/s: our server / transformers generate_batch", ratio["ours_over_transformers"],
                           ">= 5")],
            "results": r, "errors": parts.errors, "skipped": parts.skipped, "seconds": parts.seconds}


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1:]))
