"""Paged decode attention: KV bytes read per second against contiguous SDPA and a naive paged gather + SDPA.

Question: does decoding straight from the block-major paged pool cost bandwidth next to attention over
contiguous KV? One decode step of one layer, Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128,
bf16), for batch x context x block size; all sequences have the full context; blocks are scattered at
random through a pool that holds `--pool-layers` layers (the kernel reads one layer's strided view).
In the same run, on the same KV bytes:
- `paged`: the selected kernel backend (Triton on CUDA, the reference on CPU);
- `sdpa`: torch SDPA with enable_gqa on contiguous (batch, kv_heads, context, head_dim) copies, the fastest
  of the default dispatch and, on CUDA, each of the flash, cuDNN and efficient backends that takes the shape;
- `naive`: gather the pages with indexing, then the default SDPA.
Figures are logical KV bytes (keys + values of one layer) per second (GB/s = 1e9 B/s), median of
`--repeats` timed runs after `--warmup`; ratios are against `sdpa`. Combinations whose buffers exceed
`--mem-cap-gib` are skipped and listed. On CUDA a short sweep of decode launch shapes at the two goal points
shows how far the heuristic is from the best one.
Goals (H200): paged >= 0.9 x sdpa at batch 64 / 8k, >= 0.85 x sdpa at batch 16 / 32k.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import emit

from ultra_adaptive_kv_cache_engine.kernels import DecodeShape, PagedKV, plan_decode, select_backend

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GOALS = {(64, 8192): 0.9, (16, 32768): 0.85}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds per call; on CUDA each sample times enough back-to-back calls to last about 1 ms."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    inner = max(1, min(50, int(1.0 / max(start.elapsed_time(end), 1e-3))))
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1000.0 / inner)
    return statistics.median(samples)


@dataclasses.dataclass(frozen=True)
class Combo:
    batch: int
    context: int
    block_size: int

    def kv_bytes(self, itemsize: int) -> int:
        """Keys + values of one layer for the whole batch."""
        return 2 * self.batch * self.context * KV_HEADS * HEAD_DIM * itemsize

    def needed_bytes(self, itemsize: int, pool_layers: int) -> int:
        """Pool + contiguous copies + the naive path's gathered temporaries (a generous upper bound)."""
        return self.kv_bytes(itemsize) * (pool_layers + 1 + 2)


def build(combo: Combo, args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """Pool (only the measured layer filled), scattered block tables, query, contiguous K/V copies."""
    blocks = combo.batch * (combo.context // combo.block_size)
    shape = (blocks, args.pool_layers, 2, combo.block_size, KV_HEADS, HEAD_DIM)
    pool = torch.empty(shape, dtype=args.dtype, device=device)
    layer = args.pool_layers // 2
    pool[:, layer].normal_(generator=gen)
    order = torch.randperm(blocks, generator=gen, device=device)
    tables = order.view(combo.batch, -1).int()
    lens = torch.full((combo.batch,), combo.context, dtype=torch.int32, device=device)
    kv = PagedKV.from_pool(pool, layer, tables, lens, max_seq_len=combo.context)
    query = torch.randn((combo.batch, Q_HEADS, HEAD_DIM), generator=gen, device=device).to(args.dtype)
    keys = kv.key_cache[tables.long()].reshape(combo.batch, combo.context, KV_HEADS, HEAD_DIM)
    values = kv.value_cache[tables.long()].reshape(combo.batch, combo.context, KV_HEADS, HEAD_DIM)
    return {
        "kv": kv, "query": query, "q4": query.unsqueeze(2),
        "k": keys.transpose(1, 2).contiguous(), "v": values.transpose(1, 2).contiguous(),
    }


def sdpa(q4: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any = None) -> torch.Tensor:
    """SDPA with grouped KV heads; `backend` (an SDPBackend) forces one implementation, None lets torch pick."""
    if backend is None:
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)


def time_sdpa(t: dict[str, Any], device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Seconds per call of SDPA's default dispatch and, on CUDA, of each backend that accepts the shape."""
    backends: dict[str, Any] = {"default": None}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        backends.update(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                        efficient=SDPBackend.EFFICIENT_ATTENTION)
    timed = {}
    for name, backend in backends.items():
        try:
            fn = lambda b=backend: sdpa(t["q4"], t["k"], t["v"], b)  # noqa: E731
            timed[name] = median_seconds(fn, device, args.warmup, args.repeats)
        except Exception as exc:  # a backend that does not take this shape (RuntimeError, mostly)
            log(f"sdpa backend {name}: {str(exc)[:120]}")
    return timed


def naive(q4: torch.Tensor, kv: PagedKV) -> torch.Tensor:
    batch, width = kv.block_tables.shape
    idx = kv.block_tables.long()
    k = kv.key_cache[idx].view(batch, width * kv.block_size, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = kv.value_cache[idx].view(batch, width * kv.block_size, KV_HEADS, HEAD_DIM).transpose(1, 2)
    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)


def measure(combo: Combo, args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    backend = select_backend(device)
    t = build(combo, args, device, gen)
    out = torch.empty_like(t["query"])
    paged_fn = lambda: backend.decode_attention(t["query"], t["kv"], out=out)  # noqa: E731
    sdpa_timed = time_sdpa(t, device, args)
    best = min(sdpa_timed, key=sdpa_timed.__getitem__)
    timed = {
        "paged": median_seconds(paged_fn, device, args.warmup, args.repeats),
        "sdpa": sdpa_timed[best],
        "naive": median_seconds(lambda: naive(t["q4"], t["kv"]), device, args.warmup, max(3, args.repeats // 3)),
    }
    reference = sdpa(t["q4"], t["k"], t["v"]).squeeze(2).float()
    err = float((out.float() - reference).norm() / reference.norm())
    nbytes = combo.kv_bytes(t["query"].element_size())
    row: dict[str, Any] = {**dataclasses.asdict(combo), "kv_mib": round(nbytes / 2**20, 1)}
    for name, seconds in timed.items():
        row[f"{name}_ms"] = round(seconds * 1e3, 4)
        row[f"{name}_gbps"] = round(nbytes / seconds / 1e9, 3)
    row["sdpa_backend"] = best
    row["sdpa_backends_gbps"] = {name: round(nbytes / sec / 1e9, 3) for name, sec in sdpa_timed.items()}
    row["paged_vs_sdpa"] = round(timed["sdpa"] / timed["paged"], 3)
    row["naive_vs_sdpa"] = round(timed["sdpa"] / timed["naive"], 3)
    row["rel_err_vs_sdpa"] = err
    if backend.name == "triton":
        shape = DecodeShape(combo.batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM, combo.context)
        row["num_splits"] = plan_decode(shape, torch.cuda.get_device_properties(device).multi_processor_count).num_splits
    return row


def tune(combo: Combo, args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict[str, Any]:
    """Time decode launch shapes around the heuristic's (until args.deadline): split counts, key tiles, warps,
    stages; report each as a ratio to the best SDPA, the heuristic's first."""
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    t = build(combo, args, device, gen)
    out = torch.empty_like(t["query"])
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    shape = DecodeShape(combo.batch, KV_HEADS, Q_HEADS // KV_HEADS, HEAD_DIM, combo.context)
    base = plan_decode(shape, sms)
    variants = [base]
    for splits in sorted({1, max(1, base.num_splits // 2), base.num_splits * 2, base.num_splits * 4}):
        variants.append(plan_decode(shape, sms, num_splits=splits))
    for block_n in (32, 128):
        variants.append(plan_decode(shape, sms, num_splits=base.num_splits, block_n=block_n))
    variants += [dataclasses.replace(base, num_warps=8), dataclasses.replace(base, num_stages=2),
                 dataclasses.replace(base, num_stages=4)]
    variants = list(dict.fromkeys(variants))  # the heuristic's first, no shape twice
    sdpa_s = min(time_sdpa(t, device, args).values())
    rows = []
    for plan in variants:
        if time.monotonic() > args.deadline:
            break
        try:
            s = median_seconds(lambda p=plan: triton_decode_attention(t["query"], t["kv"], out=out, launch=p),
                               device, args.warmup, args.repeats)
            rows.append({**dataclasses.asdict(plan), "vs_sdpa": round(sdpa_s / s, 3)})
        except Exception as exc:  # a shape the compiler rejects: report it, keep sweeping
            rows.append({**dataclasses.asdict(plan), "error": repr(exc)[:200]})
    best = max((r for r in rows if "vs_sdpa" in r), key=lambda r: r["vs_sdpa"], default=None)
    return {**dataclasses.asdict(combo), "heuristic": rows[0] if rows else None, "best": best, "variants": rows}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU: under a minute on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--pool-layers", type=int, default=32, help="layers held by the pool (one is read)")
    p.add_argument("--mem-cap-gib", type=float, default=None, help="default: 85%% of the device's memory")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--time-budget-s", type=float, default=150.0,
                   help="skip what is left after this long (the grid gets 75%%, the sweep the rest)")
    p.add_argument("--no-tune", action="store_true", help="skip the launch-shape sweep at the goal points")
    p.add_argument("--no-save", action="store_true", help="only print the JSON line")
    args = p.parse_args()
    args.dtype = torch.bfloat16
    if args.quick:
        args.batches, args.contexts, args.block_sizes = [1, 2], [64, 256], [16]
        args.pool_layers, args.repeats, args.warmup = 2, 3, 1
    return args


def mem_cap(args: argparse.Namespace, device: torch.device) -> int:
    if args.mem_cap_gib is not None:
        return int(args.mem_cap_gib * 2**30)
    if device.type == "cuda":
        return int(0.85 * torch.cuda.get_device_properties(device).total_memory)
    return 4 * 2**30


def run_grid(args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict[str, list]:
    cap, grid_deadline = mem_cap(args, device), time.monotonic() + 0.75 * args.time_budget_s
    found: dict[str, list] = {"results": [], "skipped": [], "errors": []}
    for bs in args.block_sizes:
        for batch in args.batches:
            for context in args.contexts:
                combo = Combo(batch, context, bs)
                need = combo.needed_bytes(2, args.pool_layers)
                if need > cap:
                    found["skipped"].append({**dataclasses.asdict(combo), "reason": f"needs {need / 2**30:.0f} GiB > cap {cap / 2**30:.0f} GiB"})
                    continue
                if time.monotonic() > grid_deadline:
                    found["skipped"].append({**dataclasses.asdict(combo), "reason": "time budget spent"})
                    continue
                try:
                    row = measure(combo, args, device, gen)
                    found["results"].append(row)
                    log(f"{combo}: paged {row['paged_gbps']} GB/s, sdpa {row['sdpa_gbps']}, naive {row['naive_gbps']}")
                except Exception as exc:  # one combination failing (OOM, compiler) must not end the run
                    found["errors"].append({**dataclasses.asdict(combo), "error": repr(exc)[:300]})
                    log(f"{combo}: ERROR {exc!r}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return found


def main() -> None:
    args = parse_args()
    args.deadline = time.monotonic() + args.time_budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    found = run_grid(args, device, gen)
    goals = []
    for (batch, context), target in GOALS.items():
        for row in (r for r in found["results"] if (r["batch"], r["context"]) == (batch, context)):
            goals.append({"batch": batch, "context": context, "block_size": row["block_size"], "target": target,
                          "paged_vs_sdpa": row["paged_vs_sdpa"], "met": row["paged_vs_sdpa"] >= target})
    tuning = []
    if device.type == "cuda" and not args.no_tune and select_backend(device).name == "triton":
        for batch, context in GOALS:
            if time.monotonic() > args.deadline:
                tuning.append({"batch": batch, "context": context, "skipped": "time budget spent"})
                continue
            try:
                tuning.append(tune(Combo(batch, context, 16), args, device, gen))
            except Exception as exc:  # report and go on
                tuning.append({"batch": batch, "context": context, "error": repr(exc)[:300]})
            torch.cuda.empty_cache()
    result = {
        "backend": select_backend(device).name, "device": str(device), "dtype": "bfloat16",
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "pool_layers": args.pool_layers},
        "quick": args.quick, "seed": args.seed, **found, "goals": goals, "tuning": tuning,
    }
    emit("paged_attention" + ("_quick" if args.quick else ""), result, save=not args.no_save)


if __name__ == "__main__":
    main()
