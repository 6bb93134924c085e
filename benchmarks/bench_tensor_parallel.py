"""Tensor parallelism: is a prefix cached at one degree a hit at another, and what does each degree cost?

Question: with a random Llama sharded by transformers' TP plan over N ranks (torch.distributed: gloo on CPU,
NCCL on CUDA), does a prompt whose KV was written to the disk tier at degree 1 load at degree N (and the
reverse), with the same greedy tokens, and how much of the time to first token does loading save?
Baselines, same run, same prompts: the miss at each degree (no cached block), and degree 1 for the
decode rate. Four runs, each a fresh group over an empty pool (degree N: N new processes; degree 1 in this
process, with one torch thread like each rank):
  1. degree 1 over disk X (misses)         2. degree N over disk Y (misses)
  3. degree 1 over disk Y (hits, N -> 1)   4. degree N over disk X (hits, 1 -> N)
Every run first answers one warm-up prompt of its own (not counted). TTFT (loading from the tiers included)
is the median over prompts;
decode rate is decoded tokens (after the first) over decode time, summed over prompts (rank 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.model.parallel.launcher import RankLauncher
from ultra_adaptive_kv_cache_engine.model.parallel.prompt_job import PromptJob, run_prompt_job
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

LAUNCH_BOUND_S = 600


def prompts_for(count: int, length: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (length,), generator=generator).tolist() for _ in range(count)]


def run(folder: Path, work: Path, name: str, degree: int, disk: str, prompts: list[list[int]],
        args: argparse.Namespace) -> list[dict[str, Any]]:
    """One launch; rank 0's request lines (the warm-up dropped). Raises if the group failed."""
    config = {"model_path": str(folder), "block_size": args.block_size, "max_tokens": args.pool_tokens,
              "cpu_tier_bytes": 0, "enable_persistence": True, "persistence_path": str(work / disk),
              "model_cache_dir": str(work / "models"), "device": args.device}
    warmup = prompts_for(1, args.prompt_tokens, seed=args.seed + 1000 + len(name))
    job = PromptJob(config, [*warmup, *prompts], args.new_tokens, tokenizer="bytes", device=args.device,
                    timeout_s=120.0)
    if degree == 1:  # this process is a group of one (no WORLD_SIZE): no start-up to pay
        if run_prompt_job(job, work / name) != 0:
            raise RuntimeError(f"{name}: the degree-1 run failed")
    else:
        (work / f"{name}.json").write_text(job.to_json())
        command = [sys.executable, "-m", "ultra_adaptive_kv_cache_engine.model.parallel.prompt_job",
                   str(work / f"{name}.json"), str(work / name)]
        launcher = RankLauncher(degree, command, log_dir=work / name / "logs")
        launcher.start()
        result = launcher.wait(LAUNCH_BOUND_S)
        if not result.ok:
            log = (work / name / "logs" / "rank0.err").read_text()[-2000:]
            raise RuntimeError(f"{name}: {result.describe()}\n{log}")
    lines = [json.loads(x) for x in (work / name / "rank0.jsonl").read_text().splitlines()]
    requests = [x for x in lines if "request" in x][1:]
    print(f"{name}: degree {degree}, median ttft {statistics.median(r['ttft_s'] for r in requests):.4f}s, "
          f"cached {sum(r['cached_tokens'] for r in requests)} tokens", file=sys.stderr)
    return requests


def decode_rate(requests: list[dict[str, Any]]) -> float:
    tokens = sum(r["new_tokens"] - 1 for r in requests)
    seconds = sum(r["total_s"] - r["ttft_s"] for r in requests)
    return tokens / seconds if seconds > 0 else 0.0


def median(requests: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in requests)


def summarize(runs: dict[str, list[dict[str, Any]]], prompt_tokens: int) -> dict[str, Any]:
    outputs = {name: [r["output_ids"] for r in requests] for name, requests in runs.items()}
    total = prompt_tokens * len(runs["d1_miss"])
    return {
        "tokens_equal_across_degrees": len({json.dumps(o) for o in outputs.values()}) == 1,
        "hit_fraction_n_to_1": sum(r["cached_tokens"] for r in runs["d1_hit_from_dn"]) / total,
        "hit_fraction_1_to_n": sum(r["cached_tokens"] for r in runs["dn_hit_from_d1"]) / total,
        "ttft_s": {name: median(requests, "ttft_s") for name, requests in runs.items()},
        "fetch_s": {name: median(requests, "fetch_s") for name, requests in runs.items()},
        "publish_s_miss": {name: median(runs[name], "publish_s") for name in ("d1_miss", "dn_miss")},
        "ttft_hit_over_miss_degree_1": median(runs["d1_hit_from_dn"], "ttft_s") / median(runs["d1_miss"], "ttft_s"),
        "ttft_hit_over_miss_degree_n": median(runs["dn_hit_from_d1"], "ttft_s") / median(runs["dn_miss"], "ttft_s"),
        "ttft_miss_degree_n_over_1": median(runs["dn_miss"], "ttft_s") / median(runs["d1_miss"], "ttft_s"),
        "decode_tokens_per_s": {name: decode_rate(requests) for name, requests in runs.items()},
        "decode_degree_n_over_1": decode_rate(runs["dn_miss"]) / decode_rate(runs["d1_miss"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 3 prompts (under a minute on 2 cores)")
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/tensor_parallel.json")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden, args.prompts, args.prompt_tokens, args.new_tokens = 4, 256, 3, 256, 16
    args.pool_tokens = (args.prompts + 1) * (args.prompt_tokens + args.new_tokens) + args.block_size
    spec = TinyLlamaSpec(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                         num_kv_heads=args.kv_heads, intermediate_size=2 * args.hidden,
                         max_position_embeddings=args.prompt_tokens + args.new_tokens + 64, seed=args.seed)
    prompts = prompts_for(args.prompts, args.prompt_tokens, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        work = Path(tmp)
        build_tiny_llama(spec).model.save_pretrained(work / spec.model_id)
        folder, n = work / spec.model_id, args.degree
        runs = {
            "d1_miss": run(folder, work, "d1_miss", 1, "disk_x", prompts, args),
            "dn_miss": run(folder, work, "dn_miss", n, "disk_y", prompts, args),
            "d1_hit_from_dn": run(folder, work, "d1_hit_from_dn", 1, "disk_y", prompts, args),
            "dn_hit_from_d1": run(folder, work, "dn_hit_from_d1", n, "disk_x", prompts, args),
        }
    result = {
        "question": "cross-degree prefix hits (disk tier) and their TTFT saving; TP cost vs degree 1",
        "degree": n, "device": args.device, "backend": "nccl" if args.device == "cuda" else "gloo",
        "model": spec.model_id, "prompts": args.prompts, "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens, "block_size": args.block_size, "quick": args.quick, "seed": args.seed,
        **summarize(runs, args.prompt_tokens),
    }
    emit("tensor_parallel", result, save=not args.no_save)


if __name__ == "__main__":
    main()
