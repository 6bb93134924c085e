"""The CPU serving step: `PagedLlama.forward_packed` over working buffers against the paged gather, same run.

Question: on this machine's CPU, with the embedded SmolLM2, how much faster is one packed decode step of 8
sequences (the serving path's step on a CPU, `PagedLlamaBackend._packed`) when attention reads the working slab
(`model.working_kv`) instead of gathering every sequence's blocks from the pool layer by layer (the reference
kernels), and does it give the same logits ("working")? And with the products over transposed weight copies
too (`model.transposed_products`), as the serving backend runs on a CPU ("serving")? Also a mixed step: the
same decodes plus one prefill chunk over a cached prefix. The baseline is the paged forward as it was
(`forward_packed` without `working`, F.linear products), timed in the same process, the three contenders taking
turns step by step at the same positions (each writes the same slots), the order rotating, so drift and
neighbours land on all alike; figures are medians, a ratio the median of per-round ratios. Seeded random
prompts; the prefixes are prefilled once (causal SDPA) before timing. `lm_head` times the vocabulary product
alone: F.linear against the transposed copy, interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.loader import load_model
from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.working_kv import WorkingChunk, WorkingKV

NAME = "cpu_step"
BLOCK = 16


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="300-token contexts, 4 rounds (under a minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8, help="decoding sequences")
    p.add_argument("--context", type=int, default=None, help="tokens of each sequence before the steps (700)")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per contender (default 12; quick 4)")
    p.add_argument("--chunk", type=int, default=128, help="the mixed step's prefill chunk (tokens)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    return p.parse_args()


class Setup:
    """The model, a pool, and `batch` sequences of `context` tokens prefilled, plus one more for the chunk."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.manual_seed(args.seed)
        self.model = PagedLlama.from_hf(load_model(KVCacheConfig(device="cpu")).model)
        s, self.batch, self.context = self.model.shape, args.batch, args.context
        per = -(-(self.context + args.rounds + 4 + args.chunk) // BLOCK)
        self.pool = torch.zeros((per * (self.batch + 1), s.num_layers, 2, BLOCK, s.num_kv_heads, s.head_dim),
                                dtype=self.model.dtype)
        self.tables = [list(range(b * per, (b + 1) * per)) for b in range(self.batch + 1)]
        self.ids = torch.randint(10, 1000, (self.batch + 1, self.context + args.rounds + 4 + args.chunk)).tolist()
        for b in range(self.batch + 1):
            table = torch.tensor(self.tables[b], dtype=torch.int32)
            self.model.prefill(self.pool, torch.tensor(self.ids[b][: self.context]), 0, table)
        self.chunk = args.chunk
        # the serving contender's KV differs within rounding: it runs on a pool and a slab of its own
        self.transposed = self.model.with_transposed_products()
        self.serving_pool = self.pool.clone()
        self.serving_working = WorkingKV(s.num_layers, s.num_kv_heads, s.head_dim, self.model.dtype, self.model.device,
                                         budget_bytes=1 << 34)
        self.working = WorkingKV(s.num_layers, s.num_kv_heads, s.head_dim, self.model.dtype, self.model.device,
                                 budget_bytes=1 << 34)

    def chunks(self, j: int, mixed: bool) -> list[tuple[list[int], int, list[int]]]:
        """Step j's chunks: one token per sequence at position context + j (and the prefill chunk)."""
        at = self.context + j
        out = [(self.ids[b][at : at + 1], at, self.tables[b]) for b in range(self.batch)]
        if mixed:
            b = self.batch
            out.append((self.ids[b][self.context : self.context + self.chunk], self.context, self.tables[b]))
        return out

    def paged(self, j: int, mixed: bool) -> torch.Tensor:
        inputs = PackedInputs.pack(self.chunks(j, mixed), self.model.device, BLOCK)
        return self.model.forward_packed(self.pool, inputs)

    def buffered(self, j: int, mixed: bool) -> torch.Tensor:
        return self._over_slab(self.model, self.pool, self.working, j, mixed)

    def serving(self, j: int, mixed: bool) -> torch.Tensor:
        return self._over_slab(self.transposed, self.serving_pool, self.serving_working, j, mixed)

    def _over_slab(self, model: PagedLlama, pool: torch.Tensor, working: WorkingKV, j: int, mixed: bool
                   ) -> torch.Tensor:
        chunks = self.chunks(j, mixed)
        inputs = PackedInputs.pack(chunks, model.device, BLOCK)
        batch = working.batch(pool, [WorkingChunk(b, start, start + len(ids), table)
                                     for b, (ids, start, table) in enumerate(chunks)])
        return model.forward_packed(pool, inputs, working=batch)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def compare(setup: Setup, rounds: int, mixed: bool) -> dict[str, object]:
    """The contenders on steps 0 .. rounds + 1 (two untimed warm-ups), the order rotating from step to step."""
    contenders = [("paged", setup.paged), ("working", setup.buffered), ("serving", setup.serving)]
    times: dict[str, list[float]] = {name: [] for name, _ in contenders}
    identical, max_diff = True, 0.0
    for j in range(rounds + 2):
        order = contenders[j % 3 :] + contenders[: j % 3]
        got = {name: timed(lambda fn=fn, j=j: fn(j, mixed)) for name, fn in order}
        identical &= bool(torch.equal(got["paged"][1], got["working"][1]))
        max_diff = max(max_diff, float((got["paged"][1] - got["serving"][1]).abs().max()))
        if j >= 2:
            for name, (seconds, _) in got.items():
                times[name].append(seconds)
    out: dict[str, object] = {f"{name}_ms": round(statistics.median(t) * 1e3, 1) for name, t in times.items()}
    for name in ("working", "serving"):
        out[f"{name}_speedup"] = round(statistics.median(
            b / o for b, o in zip(times["paged"], times[name], strict=True)), 3)
    out["working_logits_identical"] = identical  # the slab alone: the same logits as the paged forward
    out["serving_max_abs_logit_diff"] = max_diff  # with the transposed products too: equal within rounding
    return out


def lm_head(setup: Setup, rounds: int) -> dict[str, object]:
    """The vocabulary product at `batch` rows: F.linear over (vocab, hidden), the baseline, against the transposed
    copy the model keeps on a CPU, (rows, hidden) @ (hidden, vocab); interleaved."""
    weight = setup.model.lm_head
    transposed = weight.t().contiguous()
    x = torch.randn((setup.batch, weight.shape[1]), dtype=weight.dtype)
    base: list[float] = []
    ours: list[float] = []
    for _ in range(rounds):
        base.append(timed(lambda: torch.nn.functional.linear(x, weight))[0])
        ours.append(timed(lambda: x @ transposed)[0])
    diff = float((torch.nn.functional.linear(x, weight) - x @ transposed).abs().max())
    return {"linear_ms": round(statistics.median(base) * 1e3, 2), "transposed_ms": round(statistics.median(ours) * 1e3, 2),
            "speedup": round(statistics.median(b / o for b, o in zip(base, ours, strict=True)), 3),
            "max_abs_diff": diff}


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.context = args.context or (300 if args.quick else 700)
    args.rounds = args.rounds or (4 if args.quick else 12)
    load_start = os.getloadavg()[0]
    setup = Setup(args)
    decode = compare(setup, args.rounds, mixed=False)
    setup.context += args.rounds + 2  # the decode steps' slots are taken: the mixed steps go on after them
    mixed = compare(setup, args.rounds, mixed=True)
    result = {"quick": args.quick, "seed": args.seed, "batch": args.batch, "context": args.context,
              "rounds": args.rounds, "chunk": args.chunk, "threads": torch.get_num_threads(),
              "model": "SmolLM2-135M-Instruct", "dtype": str(setup.model.dtype).removeprefix("torch."),
              "decode": decode, "mixed": mixed, "lm_head": lm_head(setup, 10 * args.rounds),
              "load_avg_1m": [round(load_start, 2), round(os.getloadavg()[0], 2)]}  # at the start and the end
    # a quick run writes its file only where UAKV_RESULTS_DIR points (`make bench`: results/quick/)
    emit(NAME, result, save=not args.quick or "UAKV_RESULTS_DIR" in os.environ)


if __name__ == "__main__":
    main()
