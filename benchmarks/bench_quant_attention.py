"""Paged decode attention over quantized pool slabs against bf16 blocks, and the cost of quantize on write.

Question: how much faster is one decode step's attention when sealed blocks are fp8 / int8 / int4 / int2
slabs (`PoolFormat`) instead of bf16, and what does sealing cost next to a whole decode step? Llama-3-8B
attention shape (32 query heads, 8 KV heads, head dim 128), block size 16, bf16 compute; every sequence holds
`context - block_size / 2` tokens: its full blocks sealed, its half-full tail block in full-precision staging
(the live path's KIVI window). Pools have the engine's block-major layout with `--pool-layers` layers (a
block's slab of one layer lies at a stride of all layers), blocks in random order; one layer is read.

Attention (`interleaved_timing`: rounds in rotated order, CUDA graphs of back-to-back calls, medians; a ratio
is the median of per-round ratios): for each format, one run times the bf16 pool (the existing kernel, the
baseline) and that format's pool in the same rounds (pools are built one format at a time, so the bf16 figure
appears once per format), plus on CUDA launch variants of the planned launch (for the `--sweep` formats). The
bytes a call actually reads: codes and float16 parameters of the sealed blocks (per-channel key parameters
once per block and head), bf16 staging tails; GB/s against the H200's ~4.2 TB/s. Errors are relative to the
output's norm (`rel_err_vs_reference`: the Triton kernel against the reference twin on the same slabs;
`rel_err_vs_bf16`: the format's quantisation error); with random KV an output averages thousands of random
values and is small, so these overstate the error per value.

Seal: `seal_blocks` of one block per sequence, all `--model-layers` layers, K and V (what the engine does
every `block_size` decode steps), amortised per step, as a share of a decode step of a Llama-3-8B-shaped
model at this batch, estimated as model_layers x (one layer's projection and MLP GEMMs at this batch, random
bf16 weights, + that format's attention) + the LM head GEMM (norms, RoPE and sampling left out: the step is
underestimated, so the share is an upper bound).

--quick: batch 8, context 1024, 2 pool layers, on CPU the reference kernels and GEMMs of a model 8x narrower;
it writes under benchmarks/results/quick/ via UAKV_RESULTS_DIR (`make bench`). Full runs on CUDA write
benchmarks/results/h200/quant_attention.json. Goals (H200, batch 64, context 8192): fp8 >= 1.6x and
int4 >= 2.5x faster than bf16; sealing <= 5% of a decode step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from bench_common import RESULTS, emit
from interleaved_timing import Contender, Timings, time_interleaved
from torch import Tensor

from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS, PoolFormat
from ultra_adaptive_kv_cache_engine.kernels import (
    DecodeLaunch,
    PagedKV,
    get_backend,
    plan_decode,
    select_backend,
)

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
HIDDEN, INTERMEDIATE, VOCAB = 4096, 14336, 128256
HBM_GBPS = 4200.0
GOALS = {"fp8": 1.6, "int4": 2.5}
SEAL_GOAL = 0.05


def log(msg: str) -> None:
    print(f"[quant_attention {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    context: int
    block_size: int
    pool_layers: int

    @property
    def seq_len(self) -> int:
        return self.context - self.block_size // 2

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.seq_len // self.block_size)

    @property
    def sealed_per_seq(self) -> int:
        return self.blocks_per_seq - 1


def bytes_read(shape: Shape, fmt: PoolFormat | None) -> int:
    """Bytes one decode call reads from the KV of one layer (K and V); bf16 when `fmt` is None."""
    tail_tokens = shape.seq_len - shape.sealed_per_seq * shape.block_size
    per_token_fp = 2 * KV_HEADS * HEAD_DIM * 2
    if fmt is None:
        return shape.batch * shape.seq_len * per_token_fp
    bs = shape.block_size
    data = fmt.data_bytes(bs, KV_HEADS, HEAD_DIM)
    params = sum(fmt.param_count(bs, KV_HEADS, HEAD_DIM, key) for key in (True, False)) * 2
    return shape.batch * (shape.sealed_per_seq * (2 * data + params) + tail_tokens * per_token_fp)


@dataclasses.dataclass
class World:
    """The bf16 pool and its views, the query, the block tables of the bf16 pool."""

    shape: Shape
    pool: Tensor
    tables: Tensor
    lens: Tensor
    query: Tensor
    device: torch.device

    def view(self) -> PagedKV:
        return PagedKV.from_pool(self.pool, 0, self.tables, self.lens, max_seq_len=self.shape.seq_len)


def build_world(shape: Shape, device: torch.device, gen: torch.Generator) -> World:
    blocks = shape.batch * shape.blocks_per_seq
    pool = torch.empty((blocks, shape.pool_layers, 2, shape.block_size, KV_HEADS, HEAD_DIM),
                       dtype=torch.bfloat16, device=device)
    pool[:, 0].normal_(generator=gen)  # only layer 0 is read
    tables = torch.randperm(blocks, generator=gen, device=device).view(shape.batch, -1).int()
    lens = torch.full((shape.batch,), shape.seq_len, dtype=torch.int32, device=device)
    query = torch.randn((shape.batch, Q_HEADS, HEAD_DIM), generator=gen, device=device).to(torch.bfloat16)
    return World(shape, pool, tables, lens, query, device)


def quant_view(w: World, fmt: PoolFormat, gen: torch.Generator) -> tuple[PagedKV, Tensor, Tensor]:
    """The same tokens as the bf16 pool, full blocks sealed (reference quantiser) into a pool of `fmt` in
    random order, each tail block in staging; returns (view, pool, staging)."""
    s, bs = w.shape, w.shape.block_size
    sealed = s.batch * s.sealed_per_seq
    slab = fmt.slab_bytes(bs, KV_HEADS, HEAD_DIM)
    pool = torch.empty((sealed, s.pool_layers, 2, slab), dtype=torch.uint8, device=w.device)
    staging = torch.empty((s.batch, s.pool_layers, 2, bs, KV_HEADS, HEAD_DIM), dtype=torch.bfloat16,
                          device=w.device)
    ids = torch.randperm(sealed, generator=gen, device=w.device)
    src = w.tables[:, : s.sealed_per_seq].reshape(-1).long()
    for start in range(0, sealed, 4096):
        part, dst = src[start : start + 4096], ids[start : start + 4096]
        for kv in range(2):
            pool[dst, 0, kv] = fmt.quantize(w.pool[part, 0, kv], kv == 0)
    staging[:, 0] = w.pool[w.tables[:, -1].long(), 0]
    tables = torch.cat([ids.view(s.batch, -1).int(), sealed + torch.arange(s.batch, device=w.device).int()[:, None]],
                       dim=1)
    kv = PagedKV.from_pools(pool, staging, 0, tables, w.lens, fmt, max_seq_len=s.seq_len)
    return kv, pool, staging


def rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def variants(kv: PagedKV, query: Tensor, plan: DecodeLaunch, sms: int) -> dict[str, DecodeLaunch]:
    """Launch variants around the planned one: stages and split counts (more programs per SM hide the latency
    of loads) at 128-key tiles (`sweep_fp8_decode` tries more)."""
    shape = kv.decode_shape(query)
    found: dict[str, DecodeLaunch] = {}
    for block_n, stages, splits in ((128, 1, 1), (128, 2, 1), (128, 2, 2), (128, 3, 1)):
        base = plan_decode(shape, sms, num_splits=splits, block_n=block_n)
        found[f"n{block_n}_s{stages}_x{splits}"] = dataclasses.replace(base, num_warps=4, num_stages=stages)
    return {name: launch for name, launch in found.items() if launch != plan}


def time_format(w: World, fmt: PoolFormat, args: argparse.Namespace, gen: torch.Generator,
                bf16_out: Tensor) -> dict[str, Any]:
    """bf16 and `fmt` in the same rounds (plus launch variants of `fmt` on CUDA)."""
    backend = select_backend(w.device)
    kv = quant_view(w, fmt, gen)[0]  # the view holds the pool and staging tensors
    out_q, out_b = torch.empty_like(w.query), torch.empty_like(w.query)
    base = w.view()
    backend.decode_attention(w.query, kv, out=out_q)
    row: dict[str, Any] = {"format": fmt.name, "rel_err_vs_bf16": rel_err(out_q, bf16_out)}
    if backend.name != "reference":
        ref = get_backend("reference").decode_attention(w.query, kv)  # the reference twin, same device
        row["rel_err_vs_reference"] = rel_err(out_q, ref)
    contenders = {"bf16": Contender(lambda: backend.decode_attention(w.query, base, out=out_b)),
                  fmt.name: Contender(lambda: backend.decode_attention(w.query, kv, out=out_q))}
    launches: dict[str, dict[str, Any]] = {}
    if backend.name == "triton":
        from ultra_adaptive_kv_cache_engine.kernels.triton_common import num_sms
        from ultra_adaptive_kv_cache_engine.kernels.triton_decode import (
            _launch_partitions,
            planned_launch,
            triton_decode_attention,
        )
        from ultra_adaptive_kv_cache_engine.kernels.triton_token_decode import TOKEN_SCALED_FORMATS

        sms = num_sms(w.device)
        plan = planned_launch(kv, kv.decode_shape(w.query), sms)  # what decode_attention plans for itself
        row["launch"] = dataclasses.asdict(plan)
        if fmt.name in TOKEN_SCALED_FORMATS:  # the generic QUANT kernel these formats took before, same launch
            out_g = torch.empty_like(w.query)
            generic = plan
            group = Q_HEADS // KV_HEADS

            def run_generic() -> None:
                _launch_partitions(w.query, kv, out_g, generic, group, HEAD_DIM**-0.5, specialised=False)

            run_generic()
            launches["generic"] = {**dataclasses.asdict(generic), "rel_err_vs_planned": rel_err(out_g, out_q)}
            contenders["generic"] = Contender(run_generic, optional=True)
            out_n = torch.empty_like(w.query)

            def run_no_prefetch() -> None:  # the planned launch, each tile's scales loaded in its own iteration
                _launch_partitions(w.query, kv, out_n, plan, group, HEAD_DIM**-0.5, prefetch=False)

            run_no_prefetch()
            launches["no_prefetch"] = {**dataclasses.asdict(plan), "rel_err_vs_planned": rel_err(out_n, out_q)}
            contenders["no_prefetch"] = Contender(run_no_prefetch, optional=True)
        for name, launch in variants(kv, w.query, plan, sms).items() if fmt.name in args.sweep else ():
            out_v = torch.empty_like(w.query)
            try:
                triton_decode_attention(w.query, kv, out=out_v, launch=launch)
            except Exception as exc:  # a launch the compiler rejects: say so, keep sweeping
                launches[name] = {"error": repr(exc)[:160]}
                continue
            launches[name] = {**dataclasses.asdict(launch), "rel_err_vs_planned": rel_err(out_v, out_q)}
            contenders[name] = Contender(lambda o=out_v, p=launch: triton_decode_attention(w.query, kv, out=o, launch=p),
                                         optional=True)
    t = time_interleaved(contenders, w.device, args.rounds, args.warmup, args.sample_ms / 1e3)
    nbytes = bytes_read(w.shape, fmt)
    speedups = t.ratios("bf16", fmt.name)
    row.update(
        ms=round(t.median(fmt.name) * 1e3, 4), bf16_ms=round(t.median("bf16") * 1e3, 4),
        speedup=round(statistics.median(speedups), 3), speedup_range=[round(min(speedups), 3), round(max(speedups), 3)],
        bytes_read=nbytes, bf16_bytes_read=bytes_read(w.shape, None),
        gbps=round(nbytes / t.median(fmt.name) / 1e9, 3),
        bf16_gbps=round(bytes_read(w.shape, None) / t.median("bf16") / 1e9, 3),
        timing={"method": t.method, "rounds": args.rounds, "calls_per_sample": t.calls, "note": t.note},
    )
    row["of_hbm"] = round(row["gbps"] / HBM_GBPS, 3)
    if launches:
        for name, info in launches.items():
            if name in t.samples:
                info.update(ms=round(t.median(name) * 1e3, 4), speedup=round(statistics.median(t.ratios("bf16", name)), 3))
        row["variants"] = launches
    return row


def time_step_parts(shape: Shape, args: argparse.Namespace, device: torch.device, gen: torch.Generator,
                    formats: list[PoolFormat]) -> Timings:
    """One layer's GEMMs and the LM head at this batch, and one seal per format (one block per sequence, all
    model layers), in the same rounds."""
    backend = select_backend(device)
    width = 8 if args.quick else 1
    hidden, inter, vocab = HIDDEN // width, INTERMEDIATE // width, VOCAB // width
    w = {name: torch.randn(size, generator=gen, device=device).to(torch.bfloat16) * 0.02
         for name, size in (("qkv", (hidden + 2 * KV_HEADS * HEAD_DIM // width, hidden)), ("o", (hidden, hidden)),
                            ("gate_up", (2 * inter, hidden)), ("down", (hidden, inter)), ("head", (vocab, hidden)))}
    x = torch.randn((shape.batch, hidden), generator=gen, device=device).to(torch.bfloat16)
    x_inter = torch.randn((shape.batch, inter), generator=gen, device=device).to(torch.bfloat16)

    def layer() -> None:
        F.linear(x, w["qkv"])
        F.linear(x, w["o"])
        F.linear(x, w["gate_up"])
        F.linear(x_inter, w["down"])

    contenders = {"layer_gemms": Contender(layer), "lm_head": Contender(lambda: F.linear(x, w["head"]))}
    bs, layers = shape.block_size, args.model_layers
    staging = torch.randn((shape.batch + 1, layers, 2, bs, KV_HEADS, HEAD_DIM), generator=gen,
                          device=device).to(torch.bfloat16)
    ids = torch.randperm(shape.batch, generator=gen, device=device)
    for fmt in formats:
        pool = torch.empty((2 * shape.batch, layers, 2, fmt.slab_bytes(bs, KV_HEADS, HEAD_DIM)), dtype=torch.uint8,
                           device=device)
        dest = torch.randperm(2 * shape.batch, generator=gen, device=device)[: shape.batch]
        contenders[f"seal_{fmt.name}"] = Contender(
            lambda p=pool, d=dest, f=fmt: backend.seal_blocks(staging, ids, p, d, f))
    return time_interleaved(contenders, device, args.rounds, args.warmup, args.sample_ms / 1e3)


def seal_rows(t: Timings, rows: list[dict[str, Any]], shape: Shape, args: argparse.Namespace) -> list[dict[str, Any]]:
    layer_ms, head_ms = t.median("layer_gemms") * 1e3, t.median("lm_head") * 1e3
    bf16_attn = statistics.median(r["bf16_ms"] for r in rows)
    out = []
    for r in rows:
        seal_ms = t.median(f"seal_{r['format']}") * 1e3
        step = args.model_layers * (layer_ms + r["ms"]) + head_ms
        step_bf16 = args.model_layers * (layer_ms + bf16_attn) + head_ms
        out.append({
            "format": r["format"], "seal_ms": round(seal_ms, 4), "per_step_ms": round(seal_ms / shape.block_size, 4),
            "decode_step_ms": round(step, 3), "share_of_step": round(seal_ms / shape.block_size / step, 4),
            "bf16_decode_step_ms": round(step_bf16, 3), "step_speedup_vs_bf16": round(step_bf16 / step, 3),
        })
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 8, context 1024 (CPU: the reference kernels)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--pool-layers", type=int, default=32, help="layers held by each pool (Llama-3-8B: 32)")
    p.add_argument("--model-layers", type=int, default=32, help="layers of the modelled decode step and seal")
    p.add_argument("--formats", nargs="+", default=list(POOL_FORMATS), choices=list(POOL_FORMATS))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--sample-ms", type=float, default=4.0)
    p.add_argument("--sweep", nargs="*", default=["fp8"], choices=list(POOL_FORMATS),
                   help="formats whose launch variants are timed too (CUDA); none: --sweep with no name")
    p.add_argument("--no-save", action="store_true", help="only print the JSON line")
    args = p.parse_args()
    if args.quick:
        args.batch, args.context, args.pool_layers, args.model_layers = 8, 1024, 2, 2
        args.rounds, args.warmup, args.sample_ms, args.sweep = 2, 0, 1.0, []
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = Shape(args.batch, args.context, args.block_size, args.pool_layers)
    formats = [POOL_FORMATS[name] for name in args.formats]
    w = build_world(shape, device, gen)
    bf16_out = select_backend(device).decode_attention(w.query, w.view())
    rows = []
    for fmt in formats:
        rows.append(time_format(w, fmt, args, gen, bf16_out))
        r = rows[-1]
        log(f"{fmt.name}: {r['ms']} ms vs bf16 {r['bf16_ms']} ms: {r['speedup']}x {r['speedup_range']}, "
            f"{r['gbps']} GB/s, err vs bf16 {r['rel_err_vs_bf16']:.4f}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del w
    seal = seal_rows(time_step_parts(shape, args, device, gen, formats), rows, shape, args)
    goals = [{"format": f, "target_speedup": g, "speedup": r["speedup"], "met": r["speedup"] >= g}
             for f, g in GOALS.items() for r in rows if r["format"] == f]
    goals += [{"format": s["format"], "target_seal_share": SEAL_GOAL, "share": s["share_of_step"],
               "met": s["share_of_step"] <= SEAL_GOAL} for s in seal]
    result = {
        "backend": select_backend(device).name, "device": str(device), "quick": args.quick, "seed": args.seed,
        "shape": {**dataclasses.asdict(shape), "seq_len": shape.seq_len, "q_heads": Q_HEADS, "kv_heads": KV_HEADS,
                  "head_dim": HEAD_DIM, "model_layers": args.model_layers},
        "goals_met": all(g["met"] for g in goals) if goals else None, "goals": goals,
        "attention": rows, "seal": seal,
    }
    full_cuda = device.type == "cuda" and not args.quick
    if full_cuda or args.quick:  # quick results never land next to the committed full ones
        os.environ.setdefault("UAKV_RESULTS_DIR", str(RESULTS / ("quick" if args.quick else "h200")))
    emit("quant_attention" + ("_quick" if args.quick else ""), result, save=not args.no_save and (full_cuda or args.quick))


if __name__ == "__main__":
    main()
