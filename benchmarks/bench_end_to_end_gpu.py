"""End to end on a Llama-3-8B-shaped model (random bf16 weights): our paged runner vs transformers, one run.

Questions, on one GPU, same weights, same run:
(a) TTFT of a 16k-token prompt that is not cached: our runner's full prefill (SDPA over the new tokens,
    KV written into the paged pool), and transformers' forward of the same prompt for reference;
(b) TTFT when the prompt's prefix is cached in the GPU pool (only the last block is computed), with the
    model's default prefill path (`GatherRule`: the gathered SDPA path for few new tokens over a long
    prefix) and with the paged prefill kernel forced (`PrefillPath.KERNEL`, the former path); and, per path,
    the hit's `PagedLlama.prefill` alone: the host's time to enqueue it (nothing syncs inside) and its time
    to the result (enqueue close to result: the forward is bound by the host's launches, not the GPU);
(c) TTFT when it is cached only in the CPU tier: the cache's lower tiers are a TieredStore of one pinned
    CPUTier, the blocks were written through at commit in (a), every block is evicted from the pool, and the
    runner's prefix lookup promotes them through the cache's own path (`LowerTiers.load` ->
    `tiers.load_records`: one direct copy per block from its page-locked payload into its pool slot; the
    figure counts as ours only if every block went that way). The load is timed by CUDA events around its
    copies and nothing waits for them, so the host launches the prefill while they run, as in serving (until
    2026-12-03 the load was timed by synchronising the device before and after it, which kept the prefill's
    launch from overlapping the copies and added it to the TTFT). References in the same run: the former staged
    load (every record decoded into one fresh pinned buffer, then one host-to-device copy), and one pinned
    host-to-device copy of the same bytes (the link's ceiling);
(d) decode tokens per second at batch 1 and 32 (prompt 512, 128 new tokens): our runner with CUDA graphs
    (and eagerly, for reference) vs `generate` with its DynamicCache (min_new_tokens forces the length). A
    rate counts the tokens after each row's first over the time after it.
Goals: CPU-tier TTFT <= 0.1 x uncached TTFT; decode >= 10x transformers at batch 1, >= 2x at batch 32.

`--parts` picks parts (e.g. `--parts a,c`; b and c reuse a's prompt, so they bring a along). Every part is
time-bounded by --time-budget-s (a part that would start too late is skipped and named), a
failing part is reported and the others still run, progress goes to stderr, results so far are rewritten
after each part into end_to_end_gpu.partial.json, and one JSON line goes to stdout at the end (`emit`).
--quick runs a tiny Llama on the CPU (reference kernels) through the same code in seconds.
The model and caches are built in e2e_model.py, the timed parts live in e2e_parts.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def stub_missing_modules() -> list[str]:
    """Stand-ins for dependencies this benchmark imports but never calls, when the machine lacks them: the Redis
    client (no Redis tier here) and xxhash (a CPU-tier record's checksum is computed only when it is
    serialised, which never happens in memory). Any call into a stand-in raises. Named in the JSON."""

    def unavailable(name: str) -> type:
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"{name} is not installed on this machine (a stand-in was imported)")

        return type(name, (Exception,), {"__init__": fail, "from_url": staticmethod(fail)})

    def missing(name: str) -> bool:
        try:
            importlib.import_module(name)
        except ImportError:
            return True
        return False

    stubbed = []
    if missing("redis"):
        parts = {n: types.ModuleType(n) for n in ("redis", "redis.backoff", "redis.cluster", "redis.retry",
                                                  "redis.exceptions")}
        parts["redis.exceptions"].RedisError = unavailable("RedisError")  # type: ignore[attr-defined]
        parts["redis"].exceptions = parts["redis.exceptions"]  # type: ignore[attr-defined]
        parts["redis"].Redis = unavailable("Redis")  # type: ignore[attr-defined]
        parts["redis.backoff"].NoBackoff = unavailable("NoBackoff")  # type: ignore[attr-defined]
        parts["redis.cluster"].RedisCluster = unavailable("RedisCluster")  # type: ignore[attr-defined]
        parts["redis.retry"].Retry = unavailable("Retry")  # type: ignore[attr-defined]
        sys.modules.update(parts)
        stubbed.append("redis")
    if missing("xxhash"):
        module = types.ModuleType("xxhash")
        module.xxh3_128 = unavailable("xxh3_128")  # type: ignore[attr-defined]
        sys.modules["xxhash"] = module
        stubbed.append("xxhash")
    return stubbed


STUBBED = stub_missing_modules()

import torch  # noqa: E402
from bench_common import RESULTS, emit  # noqa: E402
from e2e_model import NAME, World, build_world, log  # noqa: E402
from e2e_parts import part_cpu_tier, part_decode, part_gpu_hit, part_uncached  # noqa: E402

PARTS = ("a", "b", "c", "d")


@dataclass
class Report:
    """Results, errors and skips by part, under one deadline; rewritten to the partial file after each part."""

    deadline: float
    partial: Path
    results: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, min_s: float, fn: Callable[[], Any]) -> Any:
        left = self.deadline - time.monotonic()
        if left < min_s:
            self.skipped[name] = f"{left:.0f} s left of the time budget; the part needs about {min_s:.0f} s"
            log(f"skip {name}: {self.skipped[name]}")
            return None
        log(f"start {name} ({left:.0f} s left)")
        start = time.monotonic()
        value = None
        try:
            value = fn()
            if isinstance(value, dict):
                self.results[name] = value
        except Exception as exc:  # report the part's failure, keep going with the others
            self.errors[name] = f"{type(exc).__name__}: {exc}"[:800]
            traceback.print_exc(file=sys.stderr)
        self.seconds[name] = round(time.monotonic() - start, 1)
        log(f"done {name} in {self.seconds[name]} s: {json.dumps(self.results.get(name, self.errors.get(name)))[:400]}")
        self.partial.write_text(json.dumps(self.payload()) + "\n")
        return value

    def payload(self) -> dict[str, Any]:
        return {"results": self.results, "errors": self.errors, "skipped": self.skipped, "seconds": self.seconds}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    uncached = results.get("a_uncached", {}).get("ttft_ms")
    tier = results.get("c_cpu_tier", {})
    for label, key in (("cpu-tier TTFT / uncached TTFT (the cache's promotion: direct pinned copies)", "ttft_ms"),
                       ("cpu-tier TTFT / uncached TTFT (reference: the former staged load)", "staged_ttft_ms")):
        if uncached and tier.get(key) is not None:
            ratio = round(tier[key] / uncached, 4)
            met = ratio <= 0.1 and "path_error" not in tier
            out.append({"goal": label, "value": ratio, "target": "<= 0.1", "met": met})
    for batch, target in ((1, 10.0), (32, 2.0)):
        speed = results.get(f"d_decode_batch_{batch}", {}).get("speedup_vs_hf")
        if speed is not None:
            out.append({"goal": f"decode tok/s vs transformers at batch {batch}", "value": speed,
                        "target": f">= {target}", "met": speed >= target})
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a tiny Llama on the CPU (seconds), same code path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-tokens", type=int, default=16384)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--decode-prompt", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--init-std", type=float, default=0.02)
    p.add_argument("--hf-budget-s", type=float, default=20.0, help="longest transformers generate per batch")
    p.add_argument("--time-budget-s", type=float, default=330.0, help="parts that would start later are skipped")
    p.add_argument("--no-save", action="store_true", help="only print the JSON line")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated parts to run, of a (uncached), b (GPU hit), c (CPU tier), d (decode); "
                        "b and c bring a along")
    args = p.parse_args()
    parts = {x.strip() for x in args.parts.split(",") if x.strip()}
    if not parts or not parts <= set(PARTS):
        p.error(f"--parts={args.parts!r}: expected a comma-separated subset of {','.join(PARTS)}")
    if parts & {"b", "c"}:
        parts.add("a")
    args.parts = parts
    if args.quick:
        args.prompt_tokens, args.block_size, args.decode_prompt, args.new_tokens = 96, 16, 32, 8
        args.batches, args.init_std, args.hf_budget_s = [1, 4], 0.1, 5.0
    return args


def main() -> int:
    args = parse_args()
    torch.manual_seed(args.seed)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # tiny matrices: more threads only wait on each other
    start = time.monotonic()
    out_dir = Path(os.environ.get("UAKV_RESULTS_DIR", RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(start + args.time_budget_s, out_dir / f"{NAME}.partial.json")
    world: World | None = report.run("setup", 0, lambda: build_world(args))
    if world is not None:
        if "a" in args.parts:
            report.run("a_uncached", 10, lambda: part_uncached(world, args))
        if "a_uncached" in report.results:
            if "b" in args.parts:
                report.run("b_gpu_hit", 5, lambda: part_gpu_hit(world, args))
            if "c" in args.parts:
                report.run("c_cpu_tier", 15, lambda: part_cpu_tier(world, args))
        for batch in args.batches if "d" in args.parts else []:
            report.run(f"d_decode_batch_{batch}", 20 + args.hf_budget_s, lambda b=batch: part_decode(world, args, b))
    r = report.results
    a, b, c = r.get("a_uncached", {}), r.get("b_gpu_hit", {}), r.get("c_cpu_tier", {})
    ratios = {"gpu_hit_vs_uncached": round(b["ttft_ms"] / a["ttft_ms"], 4) if a and b else None,
              "gpu_hit_kernel_path_vs_uncached": round(b["kernel_ttft_ms"] / a["ttft_ms"], 4) if a and b else None,
              "cpu_tier_vs_uncached": round(c["ttft_ms"] / a["ttft_ms"], 4) if a and c else None,
              "cpu_tier_staged_vs_uncached": round(c["staged_ttft_ms"] / a["ttft_ms"], 4) if a and c else None}
    shape = dict(world.model.shape.__dict__) if world is not None else None
    result = {"device": str(world.device) if world else None, "dtype": str(world.model.dtype) if world else None,
              "model_shape": shape, "block_size": args.block_size, "prompt_tokens": args.prompt_tokens,
              "decode_prompt": args.decode_prompt, "quick": args.quick, "seed": args.seed,
              "parts": sorted(args.parts),
              "ratios": ratios, "goals": goals(r), "stubbed_modules": STUBBED, **report.payload(),
              "total_s": round(time.monotonic() - start, 1)}
    emit(NAME + ("_quick" if args.quick else ""), result, save=not args.no_save)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
