"""Block-pool allocate+free throughput against a plain Python list used as a stack of free ids, same run.

Question: what do ref counts, the intrusive free queue (eviction order) and all-or-nothing allocation cost
per operation compared with the cheapest possible free list? Both replay the same seeded trace of
sequences that allocate 1..16 blocks and end in random order (so frees interleave), once with
single-block calls (`allocate()` / `free([id])` vs `pop()` / `append()`) and once with batched calls
(`allocate_many(n)` / `free(ids)` vs slicing). An operation is one block allocated or one block freed.
Best of `--repeats` replays; ratios are pool / baseline throughput (1.0 = as fast as the bare list).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable

import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.memory import BlockPool, KVSpec

Trace = list[tuple[int, int]]  # (+n: allocate n blocks for a new sequence) or (-1, k: free live sequence k)


def make_trace(seed: int, num_blocks: int, steps: int) -> tuple[Trace, int]:
    """A replayable trace and its number of block operations; every allocation fits when it is issued."""
    rng = random.Random(seed)
    free, trace = num_blocks, []
    live: list[int] = []
    for _ in range(steps):
        want = rng.randint(1, 16)
        if want <= free and (not live or rng.random() < 0.5):
            trace.append((want, 0))
            live.append(want)
            free -= want
        elif live:
            k = rng.randrange(len(live))
            trace.append((-1, k))
            free += live.pop(k)
    ops = 2 * sum(n for n, _ in trace if n > 0)  # every allocated block is freed once (the tail is drained)
    return trace, ops


def replay(trace: Trace, allocate: Callable[[int], list[int]], free: Callable[[list[int]], None]) -> float:
    """Seconds to replay `trace` and free what is still live at the end."""
    live: list[list[int]] = []
    start = time.perf_counter()
    for n, k in trace:
        if n > 0:
            live.append(allocate(n))
        else:
            free(live.pop(k))
    for ids in live:
        free(ids)
    return time.perf_counter() - start


def pool_single(pool: BlockPool) -> tuple[Callable[[int], list[int]], Callable[[list[int]], None]]:
    def allocate(n: int) -> list[int]:
        return [pool.allocate() for _ in range(n)]  # type: ignore[misc]

    def free(ids: list[int]) -> None:
        for block_id in reversed(ids):
            pool.free([block_id])

    return allocate, free


def pool_batched(pool: BlockPool) -> tuple[Callable[[int], list[int]], Callable[[list[int]], None]]:
    return pool.allocate_many, pool.free  # type: ignore[return-value]


def stack_single(stack: list[int]) -> tuple[Callable[[int], list[int]], Callable[[list[int]], None]]:
    def allocate(n: int) -> list[int]:
        return [stack.pop() for _ in range(n)]

    def free(ids: list[int]) -> None:
        for block_id in reversed(ids):
            stack.append(block_id)

    return allocate, free


def stack_batched(stack: list[int]) -> tuple[Callable[[int], list[int]], Callable[[list[int]], None]]:
    def allocate(n: int) -> list[int]:
        ids = stack[-n:]
        del stack[-n:]
        return ids

    def free(ids: list[int]) -> None:
        stack.extend(reversed(ids))

    return allocate, free


def best_ops_per_s(trace: Trace, ops: int, repeats: int, make: Callable[[], tuple]) -> float:
    best = min(replay(trace, *make()) for _ in range(repeats))
    return ops / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short trace (well under a minute on 2 cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-save", action="store_true", help="only print the JSON line")
    args = parser.parse_args()
    steps = 20_000 if args.quick else 200_000
    trace, ops = make_trace(args.seed, args.num_blocks, steps)
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, block_size=16, dtype=torch.float16)
    pool = BlockPool(spec, args.num_blocks)
    stack = list(range(args.num_blocks - 1, -1, -1))
    print(f"trace: {len(trace)} steps, {ops} block operations", file=sys.stderr)
    figures = {
        "pool_single": best_ops_per_s(trace, ops, args.repeats, lambda: pool_single(pool)),
        "list_single": best_ops_per_s(trace, ops, args.repeats, lambda: stack_single(stack)),
        "pool_batched": best_ops_per_s(trace, ops, args.repeats, lambda: pool_batched(pool)),
        "list_batched": best_ops_per_s(trace, ops, args.repeats, lambda: stack_batched(stack)),
    }
    assert pool.num_free == args.num_blocks and len(stack) == args.num_blocks  # every block came back
    result = {
        "question": "block-pool allocate+free ops/s vs a Python list stack of free ids",
        "seed": args.seed,
        "quick": args.quick,
        "num_blocks": args.num_blocks,
        "trace_steps": len(trace),
        "block_ops": ops,
        **{f"{name}_ops_per_s": round(value) for name, value in figures.items()},
        "ratio_single_pool_vs_list": round(figures["pool_single"] / figures["list_single"], 3),
        "ratio_batched_pool_vs_list": round(figures["pool_batched"] / figures["list_batched"], 3),
    }
    emit("block_pool", result, save=not args.no_save)


if __name__ == "__main__":
    main()
