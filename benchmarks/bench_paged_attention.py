"""Paged decode attention: KV bytes read per second against contiguous SDPA and a naive paged gather + SDPA.

Question: does decoding straight from the block-major paged pool cost bandwidth next to attention over
contiguous KV? One decode step of one layer, Llama-3-8B shape (32 query heads, 8 KV heads, head dim 128,
bf16), for batch x context x block size; every sequence has the full context. The pool has the engine's
layout (`KVSpec`: all `--pool-layers` layers of a block together, so one layer's slab of a block is
block_size x 2 KiB per K or V, at a stride of pool_layers times that), its blocks handed out in random order
(a pool after churn); the kernel reads one layer's strided view.

Contenders, all timed in the same rounds on the same KV bytes (`interleaved_timing`: order rotated per
round, CUDA graphs of back-to-back calls, medians; ratios are medians of per-round ratios):
- `paged`: the backend's decode_attention as the engine calls it (Triton on CUDA, planning its own launch;
  the reference on CPU);
- `sdpa_<name>`: torch SDPA with enable_gqa on contiguous (batch, kv_heads, context, head_dim) copies, the
  default dispatch and, on CUDA, each of the flash, cuDNN and efficient backends that takes the shape; the
  fastest median is the baseline `sdpa` of every ratio;
- `naive`: gather the pages with indexing, then the default SDPA (eager launches).
Each call reads the next of `copies` layers (and contiguous copies), enough that 4x the L2 cache lies between
two reads of the same bytes, as in a model where the other layers run in between.

Goal combinations run first, for every block size, and on CUDA with Triton the same rounds also time launch
variants of the heuristic's plan (tiles, splits, stages, warps, grid order) and two layout diagnostics (the
same pool with its blocks in table order; a dense pool of only the layers read, so no page holds a single
block's slab): the sweep's figure for the heuristic is the main table's, by construction. Figures are logical
KV bytes (keys + values of one layer) per second (GB/s = 1e9 B/s). Combinations whose buffers exceed
`--mem-cap-gib` are skipped and listed; the rest of the grid runs while `--time-budget-s` lasts.
Goals (H200): paged >= 0.9 x sdpa at batch 64 / 8k, >= 0.85 x sdpa at batch 16 / 32k, for every block size.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import emit
from interleaved_timing import Contender, Timings, rotating, time_interleaved
from torch import Tensor

from ultra_adaptive_kv_cache_engine.kernels import (
    DecodeLaunch,
    DecodeShape,
    PagedKV,
    plan_decode,
    select_backend,
)

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GOALS = {(64, 8192): 0.9, (16, 32768): 0.85}
#: Share of the time budget that one goal combination's launch sweep may use.
SWEEP_SHARE = 0.15


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Combo:
    batch: int
    context: int
    block_size: int

    @property
    def is_goal(self) -> bool:
        return (self.batch, self.context) in GOALS

    def kv_bytes(self, itemsize: int = 2) -> int:
        """Keys + values of one layer for the whole batch."""
        return 2 * self.batch * self.context * KV_HEADS * HEAD_DIM * itemsize

    def needed_bytes(self, pool_layers: int, copies: int, tuned: bool) -> int:
        """Pool + contiguous copies + the naive path's gathered temporaries (+ the dense diagnostic pool)."""
        return self.kv_bytes() * (pool_layers + copies + 2 + (copies if tuned else 0))


@dataclasses.dataclass(frozen=True)
class Setup:
    """One combination's tensors: `copies` layers of the pool read through scattered block tables, their
    contiguous K/V copies, the query; when tuned, the same bytes again in table order (other layers of the
    same pool, block ids ascending: empty when the pool has too few layers) and in a dense pool of only the
    layers read (same block ids)."""

    views: list[PagedKV]
    ordered: list[PagedKV]
    dense: list[PagedKV]
    query: Tensor
    keys: list[Tensor]
    values: list[Tensor]

    @property
    def q4(self) -> Tensor:
        return self.query.unsqueeze(2)


def copies_for(combo: Combo, device: torch.device, pool_layers: int) -> int:
    """Layers read in turn: enough that 4x the L2 cache separates two reads of one layer (1 on CPU)."""
    if device.type != "cuda":
        return 1
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20)
    return max(1, min(pool_layers, math.ceil(4 * l2 / combo.kv_bytes())))


def build(combo: Combo, args: argparse.Namespace, device: torch.device, gen: torch.Generator, copies: int,
          tuned: bool) -> Setup:
    batch, context, bs = combo.batch, combo.context, combo.block_size
    blocks = batch * (context // bs)
    pool = torch.empty((blocks, args.pool_layers, 2, bs, KV_HEADS, HEAD_DIM), dtype=args.dtype, device=device)
    for layer in range(copies):  # only the layers read hold values
        pool[:, layer].normal_(generator=gen)
    tables = torch.randperm(blocks, generator=gen, device=device).view(batch, -1).int()
    in_order = torch.arange(blocks, dtype=torch.int32, device=device).view(batch, -1)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)

    def views(p: Tensor, t: Tensor) -> list[PagedKV]:
        return [PagedKV.from_pool(p, i, t, lens, max_seq_len=context) for i in range(copies)]

    def contiguous(cache: Tensor) -> Tensor:
        return cache[tables.long()].reshape(batch, context, KV_HEADS, HEAD_DIM).transpose(1, 2).contiguous()

    scattered = views(pool, tables)
    ordered: list[PagedKV] = []
    dense: list[PagedKV] = []
    if tuned and 2 * copies <= args.pool_layers:  # the same bytes in table order, in layers nothing else reads
        flat = tables.flatten().long()
        for layer in range(copies):
            pool[:, copies + layer] = pool[flat, layer]
        ordered = [PagedKV.from_pool(pool, copies + i, in_order, lens, max_seq_len=context) for i in range(copies)]
    if tuned:
        dense = views(pool[:, :copies].clone(), tables)
    query = torch.randn((batch, Q_HEADS, HEAD_DIM), generator=gen, device=device).to(args.dtype)
    return Setup(scattered, ordered, dense, query,
                 [contiguous(kv.key_cache) for kv in scattered], [contiguous(kv.value_cache) for kv in scattered])


def sdpa(q4: Tensor, k: Tensor, v: Tensor, backend: Any = None) -> Tensor:
    """SDPA with grouped KV heads; `backend` (an SDPBackend) forces one implementation, None lets torch pick."""
    if backend is None:
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)


def naive(q4: Tensor, kv: PagedKV) -> Tensor:
    batch, width = kv.block_tables.shape
    idx = kv.block_tables.long()
    k = kv.key_cache[idx].view(batch, width * kv.block_size, KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = kv.value_cache[idx].view(batch, width * kv.block_size, KV_HEADS, HEAD_DIM).transpose(1, 2)
    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)


def sdpa_contenders(s: Setup, device: torch.device) -> dict[str, Contender]:
    """SDPA's default dispatch and, on CUDA, every forced backend that takes the shape."""
    backends: dict[str, Any] = {"default": None}
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend

        backends.update(flash=SDPBackend.FLASH_ATTENTION, cudnn=SDPBackend.CUDNN_ATTENTION,
                        efficient=SDPBackend.EFFICIENT_ATTENTION)
    found = {}
    for name, backend in backends.items():
        calls = [lambda k=k, v=v, b=backend: sdpa(s.q4, k, v, b) for k, v in zip(s.keys, s.values, strict=True)]
        try:
            calls[0]()
        except Exception as exc:  # a backend that does not take this shape (RuntimeError, mostly)
            log(f"sdpa backend {name}: {str(exc)[:120]}")
            continue
        found[f"sdpa_{name}"] = Contender(rotating(calls), optional=backend is not None)
    return found


def rel_err(fn: Callable[[], Tensor], out: Tensor, reference: Tensor) -> float:
    out.fill_(float("nan"))
    fn()
    return float((out.float() - reference).norm() / reference.norm())


def sweep_variants(s: Setup, plan: DecodeLaunch, shape: DecodeShape, sms: int) -> list[tuple[str, list, DecodeLaunch]]:
    """Launch variants around the heuristic's `plan` and the layout diagnostics, most telling first."""
    n, other = plan.num_splits, 64 if plan.block_n >= 128 else 128
    found = [
        ("blocks_in_order", s.ordered, plan), ("dense_pool", s.dense, plan),
        ("batch_major_grid", s.views, dataclasses.replace(plan, heads_first=False)),
        (f"block_n_{other}", s.views, plan_decode(shape, sms, num_splits=n, block_n=other)),
        ("splits_x2", s.views, plan_decode(shape, sms, num_splits=2 * n, block_n=plan.block_n)),
        ("splits_half", s.views, plan_decode(shape, sms, num_splits=max(1, n // 2), block_n=plan.block_n)),
        ("stages_minus_1", s.views, dataclasses.replace(plan, num_stages=plan.num_stages - 1)),
        ("stages_plus_1", s.views, dataclasses.replace(plan, num_stages=plan.num_stages + 1)),
        ("warps_8", s.views, dataclasses.replace(plan, num_warps=8)),
    ]
    seen: set[DecodeLaunch] = {plan}
    kept = []
    for name, views, launch in found:
        if views and (views is not s.views or (launch not in seen and launch.num_stages >= 1)):
            seen.add(launch)
            kept.append((name, views, launch))
    return kept


def add_sweep(s: Setup, plan: DecodeLaunch, sms: int, out: Tensor, reference: Tensor, deadline: float,
              contenders: dict[str, Contender], launches: dict[str, dict]) -> dict[str, str]:
    """Compile and check each variant while time lasts; add it to `contenders` and its launch to `launches`;
    returns the variants left out and why."""
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import triton_decode_attention

    left_out = {}
    for name, views, launch in sweep_variants(s, plan, s.views[0].decode_shape(s.query), sms):
        if time.monotonic() > deadline:
            left_out[name] = "time budget spent"
            continue
        calls = [lambda kv=kv, p=launch: triton_decode_attention(s.query, kv, out=out, launch=p) for kv in views]
        try:
            err = rel_err(calls[0], out, reference)
        except Exception as exc:  # a shape the compiler rejects (shared memory): report it, keep sweeping
            left_out[name] = repr(exc)[:200]
            continue
        contenders[name] = Contender(rotating(calls), optional=True)
        launches[name] = {**dataclasses.asdict(launch), "rel_err": err}
    return left_out


def summarise(t: Timings, name: str, baseline: str, nbytes: int) -> dict[str, Any]:
    ratios = t.ratios(baseline, name)
    return {"ms": round(t.median(name) * 1e3, 4), "gbps": round(nbytes / t.median(name) / 1e9, 3),
            "vs_sdpa": round(statistics.median(ratios), 3), "vs_sdpa_range": [round(min(ratios), 3), round(max(ratios), 3)]}


def measure(combo: Combo, args: argparse.Namespace, device: torch.device, gen: torch.Generator,
            tune: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One combination: the main-table row and, when `tune`, its launch sweep (same rounds, same baseline)."""
    started, backend = time.monotonic(), select_backend(device)
    copies = copies_for(combo, device, args.pool_layers)
    s = build(combo, args, device, gen, copies, tune)
    out = torch.empty_like(s.query)
    reference = sdpa(s.q4, s.keys[0], s.values[0]).squeeze(2).float()
    contenders = sdpa_contenders(s, device)
    paged = [lambda kv=kv: backend.decode_attention(s.query, kv, out=out) for kv in s.views]
    err = rel_err(paged[0], out, reference)
    contenders["paged"] = Contender(rotating(paged))
    contenders["naive"] = Contender(rotating([lambda kv=kv: naive(s.q4, kv) for kv in s.views]), graph=False)
    row: dict[str, Any] = {**dataclasses.asdict(combo), "kv_mib": round(combo.kv_bytes() / 2**20, 1), "copies": copies}
    launches: dict[str, dict] = {}
    left_out: dict[str, str] = {}
    if backend.name == "triton":
        from ultra_adaptive_kv_cache_engine.kernels.triton_common import num_sms

        sms = num_sms(device)
        plan = plan_decode(s.views[0].decode_shape(s.query), sms)  # what decode_attention plans for itself
        row["launch"] = dataclasses.asdict(plan)
        launches["heuristic"] = {**row["launch"], "rel_err": err}
        if tune:
            deadline = min(args.deadline, started + SWEEP_SHARE * args.time_budget_s)
            left_out = add_sweep(s, plan, sms, out, reference, deadline, contenders, launches)
    t = time_interleaved(contenders, device, args.rounds, args.warmup, args.sample_ms / 1e3, multiple=copies)
    sdpa_names = [n for n in t.samples if n.startswith("sdpa_")]
    best = min(sdpa_names, key=t.median)
    nbytes = combo.kv_bytes()
    paged_fig, naive_fig = summarise(t, "paged", best, nbytes), summarise(t, "naive", best, nbytes)
    row.update(
        paged_ms=paged_fig["ms"], sdpa_ms=round(t.median(best) * 1e3, 4), naive_ms=naive_fig["ms"],
        paged_gbps=paged_fig["gbps"], sdpa_gbps=round(nbytes / t.median(best) / 1e9, 3), naive_gbps=naive_fig["gbps"],
        sdpa_backend=best.removeprefix("sdpa_"),
        sdpa_backends_gbps={n.removeprefix("sdpa_"): round(nbytes / t.median(n) / 1e9, 3) for n in sdpa_names},
        paged_vs_sdpa=paged_fig["vs_sdpa"], paged_vs_sdpa_range=paged_fig["vs_sdpa_range"],
        naive_vs_sdpa=naive_fig["vs_sdpa"], rel_err_vs_sdpa=err,
        timing={"method": t.method, "rounds": args.rounds, "calls_per_sample": t.calls, "note": t.note},
    )
    if not tune or backend.name != "triton":
        return row, None
    variants = [{"name": name, **launch, **summarise(t, "paged" if name == "heuristic" else name, best, nbytes)}
                for name, launch in launches.items() if name == "heuristic" or name in t.samples]
    top = max(variants, key=lambda v: v["vs_sdpa"])
    return row, {**dataclasses.asdict(combo), "variants": variants, "best": top["name"], "left_out": left_out}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU: under a minute on 2 cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 32768])
    p.add_argument("--block-sizes", type=int, nargs="+", default=[16, 64])
    p.add_argument("--pool-layers", type=int, default=32, help="layers held by the pool (Llama-3-8B: 32)")
    p.add_argument("--mem-cap-gib", type=float, default=None, help="default: 85%% of the device's memory")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each contender first")
    p.add_argument("--rounds", type=int, default=9, help="timed samples of each contender, interleaved")
    p.add_argument("--sample-ms", type=float, default=3.0, help="about this long per sample (many calls)")
    p.add_argument("--time-budget-s", type=float, default=150.0,
                   help="goal combinations always run (each sweep gets 15%%); the rest of the grid runs while this lasts")
    p.add_argument("--no-tune", action="store_true", help="skip the launch sweep at the goal combinations")
    p.add_argument("--no-save", action="store_true", help="only print the JSON line")
    args = p.parse_args()
    args.dtype = torch.bfloat16
    if args.quick:
        args.batches, args.contexts, args.block_sizes = [1, 2], [64, 256], [16]
        args.pool_layers, args.rounds, args.warmup, args.sample_ms = 2, 3, 1, 5.0
    return args


def mem_cap(args: argparse.Namespace, device: torch.device) -> int:
    if args.mem_cap_gib is not None:
        return int(args.mem_cap_gib * 2**30)
    if device.type == "cuda":
        return int(0.85 * torch.cuda.get_device_properties(device).total_memory)
    return 4 * 2**30


def run_grid(args: argparse.Namespace, device: torch.device, gen: torch.Generator) -> dict[str, list]:
    """Goal combinations first (always measured, swept on CUDA), then the rest of the grid while time lasts."""
    cap, tune = mem_cap(args, device), device.type == "cuda" and not args.no_tune
    combos = [Combo(b, c, bs) for bs in args.block_sizes for b in args.batches for c in args.contexts]
    combos.sort(key=lambda c: not c.is_goal)  # stable: goal combinations first, in grid order
    found: dict[str, list] = {"results": [], "tuning": [], "skipped": [], "errors": []}
    for combo in combos:
        need = combo.needed_bytes(args.pool_layers, copies_for(combo, device, args.pool_layers), tune and combo.is_goal)
        if need > cap:
            found["skipped"].append({**dataclasses.asdict(combo), "reason": f"needs {need / 2**30:.0f} GiB > cap {cap / 2**30:.0f} GiB"})
            continue
        if not combo.is_goal and time.monotonic() > args.deadline:
            found["skipped"].append({**dataclasses.asdict(combo), "reason": "time budget spent"})
            continue
        try:
            row, tuning = measure(combo, args, device, gen, tune and combo.is_goal)
            found["results"].append(row)
            if tuning is not None:
                found["tuning"].append(tuning)
            log(f"{combo}: paged {row['paged_gbps']} GB/s, sdpa {row['sdpa_gbps']} ({row['sdpa_backend']}), "
                f"ratio {row['paged_vs_sdpa']} {row['paged_vs_sdpa_range']}, naive {row['naive_gbps']}")
        except Exception as exc:  # one combination failing (OOM, compiler) must not end the run
            found["errors"].append({**dataclasses.asdict(combo), "error": repr(exc)[:300]})
            log(f"{combo}: ERROR {exc!r}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return found


def goals(found: dict[str, list], args: argparse.Namespace) -> list[dict[str, Any]]:
    """One entry per goal in the grid and block size: the measured ratio, or why there is none."""
    rows = {(r["batch"], r["context"], r["block_size"]): r for r in found["results"]}
    entries = []
    for (batch, context), target in GOALS.items():
        if batch not in args.batches or context not in args.contexts:
            continue
        for bs in args.block_sizes:
            row = rows.get((batch, context, bs))
            entry = {"batch": batch, "context": context, "block_size": bs, "target": target}
            if row is None:
                entries.append({**entry, "met": None, "why": "not measured (see skipped/errors)"})
            else:
                entries.append({**entry, "paged_vs_sdpa": row["paged_vs_sdpa"], "range": row["paged_vs_sdpa_range"],
                                "met": row["paged_vs_sdpa"] >= target})
    return entries


def main() -> None:
    args = parse_args()
    args.deadline = time.monotonic() + args.time_budget_s
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    found = run_grid(args, device, gen)
    reached = goals(found, args)
    met = all(g["met"] for g in reached) if reached and all(g["met"] is not None for g in reached) else None
    result = {
        "backend": select_backend(device).name, "device": str(device), "dtype": "bfloat16",
        "shape": {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "pool_layers": args.pool_layers},
        "quick": args.quick, "seed": args.seed, "goals_met": met, "goals": reached, **found,
    }
    emit("paged_attention" + ("_quick" if args.quick else ""), result, save=not args.no_save)


if __name__ == "__main__":
    main()
