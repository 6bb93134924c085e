"""Launch and code-load variants of the fp8 decode kernel (`triton_token_decode`) against bf16 blocks, one run.

Question: which launch of the fp8 kernel reads fastest at the issue's shape (batch 64, 8k context, Llama-3-8B
attention, block size 16): key tile, warps, pipeline stages, split count, a register cap (`maxnreg`: more
programs per SM), codes loaded as bytes or through fp8 pointers, scales prefetched or not. World and byte
counts are `bench_quant_attention`'s. Each variant is checked against the planned launch's output (relative
error) and timed with `triton.testing.do_bench` (median); the bf16 kernel is timed before and after the
variants (its spread is the noise). CUDA only; writes fp8_decode_sweep.json where UAKV_RESULTS_DIR points.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import torch
from bench_common import emit
from bench_quant_attention import (
    HEAD_DIM,
    KV_HEADS,
    Q_HEADS,
    Shape,
    build_world,
    bytes_read,
    quant_view,
    rel_err,
)

from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS
from ultra_adaptive_kv_cache_engine.kernels import get_backend
from ultra_adaptive_kv_cache_engine.kernels.launch_plan import plan_decode, plan_quant_decode

# name -> (block_n, num_warps, num_stages, splits, max_registers, byte_loads, prefetch); None: the plan's
VARIANTS: dict[str, tuple[Any, ...]] = {
    "planned": (None, None, None, None, None, False, True),
    "bytes": (None, None, None, None, None, True, True),
    "typed_s1": (None, None, 1, None, None, False, True),
    "bytes_s1": (None, None, 1, None, None, True, True),
    "bytes_s1_nopf": (None, None, 1, None, None, True, False),
    "typed_s1_nopf": (None, None, 1, None, None, False, False),
    "bytes_s1_x2": (None, None, 1, 2, None, True, True),
    "bytes_s1_x3": (None, None, 1, 3, None, True, True),
    "bytes_n256_s1": (256, None, 1, None, None, True, True),
    "bytes_n256_s1_w8": (256, 8, 1, None, None, True, True),
    "bytes_n64_s1": (64, None, 1, None, None, True, True),
    "bytes_s1_r168": (None, None, 1, None, 168, True, True),
    "bytes_x2": (None, None, None, 2, None, True, True),
}


def log(msg: str) -> None:
    print(f"[fp8_sweep {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rep-ms", type=int, default=300)
    args = p.parse_args()
    import triton.testing

    from ultra_adaptive_kv_cache_engine.kernels.triton_common import num_sms
    from ultra_adaptive_kv_cache_engine.kernels.triton_decode import _launch_partitions

    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = Shape(args.batch, args.context, 16, 32)
    w = build_world(shape, device, gen)
    fmt = POOL_FORMATS["fp8"]
    kv = quant_view(w, fmt, gen)[0]
    backend = get_backend("triton")
    base, out_b = w.view(), torch.empty_like(w.query)
    sms = num_sms(device)
    planned = plan_quant_decode(kv.decode_shape(w.query), sms)
    ref = torch.empty_like(w.query)
    group = Q_HEADS // KV_HEADS

    def bench(fn: Any) -> float:
        fn()
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=50, rep=args.rep_ms, return_mode="median"))

    bf16_before = bench(lambda: backend.decode_attention(w.query, base, out=out_b))
    rows: dict[str, Any] = {}
    for name, (block_n, warps, stages, splits, regs, byte_loads, prefetch) in VARIANTS.items():
        plan = plan_decode(kv.decode_shape(w.query), sms, num_splits=splits, block_n=block_n)
        plan = dataclasses.replace(plan, num_warps=warps or planned.num_warps,
                                   num_stages=stages or min(plan.num_stages, planned.num_stages), max_registers=regs)
        out = ref if name == "planned" else torch.empty_like(w.query)

        def run(o: torch.Tensor = out, pl: Any = plan, bl: bool = byte_loads, pf: bool = prefetch) -> None:
            _launch_partitions(w.query, kv, o, pl, group, HEAD_DIM**-0.5, prefetch=pf, byte_loads=bl)

        try:
            ms = bench(run)
        except Exception as exc:  # a launch the compiler rejects: say so, keep sweeping
            rows[name] = {"error": repr(exc)[:200]}
            log(f"{name}: {rows[name]['error']}")
            continue
        rows[name] = {**dataclasses.asdict(plan), "byte_loads": byte_loads, "prefetch": prefetch,
                      "ms": round(ms, 4), "rel_err_vs_planned": rel_err(out, ref),
                      "gbps": round(bytes_read(shape, fmt) / ms / 1e6, 1)}
        log(f"{name}: {rows[name]['ms']} ms")
    bf16_after = bench(lambda: backend.decode_attention(w.query, base, out=out_b))
    bf16 = (bf16_before + bf16_after) / 2
    for row in rows.values():
        if "ms" in row:
            row["speedup"] = round(bf16 / row["ms"], 3)
    best = min((n for n in rows if "ms" in rows[n]), key=lambda n: rows[n]["ms"])
    emit("fp8_decode_sweep", {"gpu": torch.cuda.get_device_name(device), "batch": args.batch, "context": args.context,
                              "block_size": 16, "bf16_ms": [round(bf16_before, 4), round(bf16_after, 4)],
                              "bf16_gbps": round(bytes_read(shape, None) / bf16 / 1e6, 1),
                              "fp8_bytes_read": bytes_read(shape, fmt), "best": best, "variants": rows})


if __name__ == "__main__":
    main()
