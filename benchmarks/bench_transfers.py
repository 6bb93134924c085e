"""Scattered KV blocks device <-> pinned host through `BlockTransfer`, against one contiguous copy of the bytes.

Question: does moving n scattered blocks of the block-major pool cost more than one contiguous copy of the
same number of bytes? Default: 1,000 random blocks out of a 4,000-block pool of Llama-3-8B KV (32 layers,
K and V, 16 tokens, 8 KV heads, head dim 128, bf16: 2 MiB per block, 2 GiB moved). In the same run, on the
same pinned host buffer: `blocks` (gather on the device into a staging buffer + one non_blocking copy;
the reverse way one copy + scatter) and `contiguous` (one copy between a contiguous device tensor and the
host buffer); for information also `per_block` (one copy_ per block). Median of `--repeats` synchronised
runs after `--warmup`; GB/s = 1e9 bytes per second; ratios are blocks / contiguous per direction.
Goal (H200): >= 0.8 of the contiguous copy each way. On CPU (--quick) the host buffer cannot be pinned and
the "transfer" is a gather/scatter within host memory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.kernels import BlockTransfer

GOAL = 0.8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU: seconds)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--blocks", type=int, default=1000, help="blocks moved")
    p.add_argument("--pool-blocks", type=int, default=4000)
    p.add_argument("--block-tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-save", action="store_true", help="only print the JSON line")
    args = p.parse_args()
    if args.quick:
        args.blocks, args.pool_blocks, args.layers, args.kv_heads, args.head_dim = 50, 200, 4, 2, 32
        args.repeats = 3
    return args


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    shape = (args.pool_blocks, args.layers, 2, args.block_tokens, args.kv_heads, args.head_dim)
    pool = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(generator=gen)
    ids = torch.randperm(args.pool_blocks, generator=gen, device=device)[: args.blocks]
    transfer = BlockTransfer(pool, max_blocks=args.blocks)
    host = transfer.host_buffer(args.blocks)
    contiguous = torch.empty((args.blocks, *shape[1:]), dtype=pool.dtype, device=device).normal_(generator=gen)
    nbytes = host.numel() * host.element_size()
    log(f"{args.blocks} blocks of {nbytes // args.blocks / 2**20:.2f} MiB, {nbytes / 2**30:.2f} GiB, on {device}")

    transfer.to_host(ids, out=host)  # correctness first: the bytes that arrive are the blocks asked for
    sample = torch.randperm(args.blocks, generator=torch.Generator().manual_seed(args.seed))[:8].tolist()
    exact_d2h = all(torch.equal(host[i], pool[int(ids[i])].cpu()) for i in sample)
    ids_list = ids.tolist()

    def per_block_d2h() -> None:
        for i, b in enumerate(ids_list):
            host[i].copy_(pool[b], non_blocking=True)

    def per_block_h2d() -> None:
        for i, b in enumerate(ids_list):
            pool[b].copy_(host[i], non_blocking=True)

    w, r = args.warmup, args.repeats
    timed = {
        "d2h_blocks": median_seconds(lambda: transfer.to_host(ids, out=host), device, w, r),
        "d2h_contiguous": median_seconds(lambda: host.copy_(contiguous, non_blocking=True), device, w, r),
        "d2h_per_block": median_seconds(per_block_d2h, device, 0, 1),
        "h2d_blocks": median_seconds(lambda: transfer.from_host(host, ids), device, w, r),
        "h2d_contiguous": median_seconds(lambda: contiguous.copy_(host, non_blocking=True), device, w, r),
        "h2d_per_block": median_seconds(per_block_h2d, device, 0, 1),
    }
    host[0].fill_(1.5)
    transfer.from_host(host, ids)
    exact_h2d = bool((pool[int(ids[0])] == 1.5).all()) and torch.equal(pool[int(ids[1])].cpu(), host[1])
    gbps = {name: round(nbytes / s / 1e9, 3) for name, s in timed.items()}
    ratios = {way: round(gbps[f"{way}_blocks"] / gbps[f"{way}_contiguous"], 3) for way in ("d2h", "h2d")}
    result = {
        "device": str(device), "pinned": host.is_pinned(), "blocks": args.blocks, "pool_blocks": args.pool_blocks,
        "block_mib": round(nbytes / args.blocks / 2**20, 3), "total_gib": round(nbytes / 2**30, 3),
        "backend": transfer.backend.name, "gbps": gbps, "ms": {k: round(v * 1e3, 3) for k, v in timed.items()},
        "blocks_vs_contiguous": ratios, "goal": GOAL, "met": {k: v >= GOAL for k, v in ratios.items()},
        "exact": exact_d2h and exact_h2d, "quick": args.quick, "seed": args.seed,
    }
    emit("transfers" + ("_quick" if args.quick else ""), result, save=not args.no_save)


if __name__ == "__main__":
    main()
