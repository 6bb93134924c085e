"""Compute or load: the optimizer's per-prompt split against always loading and always recomputing.

Question: with the prompt's KV cached on a slow tier (a disk tier throttled to `--disk-mbps`), is the time
to first token of the PerformanceOptimizer's plan at most 1.1 x the cheaper of loading every cached block
and recomputing the whole prompt, for prompts of 512 to 4,096 tokens (SmolLM2-135M-Instruct, CPU)?
Per prompt length, in one run and on the same prompt:
- recompute: `generate_with_prefix_cache` on an empty paged cache (its KV then goes to the disk tier);
- load: read every usable block from the throttled disk tier, install it in an empty paged cache, generate;
- optimizer: plan from the measured models (prefill probe + every earlier prompt; disk probe + every earlier
  load), load the planned blocks, recompute the rest; the plan's own time counts.
The optimizer of prompt n never saw a measurement of prompt n. Torch runs one intra-op thread by default:
on a shared 2-core machine, 2 OpenMP threads stall whenever the other core is busy (10-100x slower), and
this benchmark reports ratios, not absolute speed. Each path is warmed up once per length (not
timed); then the three are timed back to back in rotating order, `--repeats` times. The cheaper path is
the one with the lower median TTFT; `ratio` is the median over repeats of TTFT(optimizer) / TTFT(cheaper)
within one repeat (paired, so slow drift of the machine's load cancels); `ratio_of_medians` is reported too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.optimizer import CachedBlock, PerformanceOptimizer
from ultra_adaptive_kv_cache_engine.tiers import (
    BlockRecord,
    DiskTier,
    PutResult,
    Tier,
    TierUsage,
    encode_block,
)

TIER = "disk"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class ThrottledTier(Tier):
    """A tier whose reads take at least nbytes / bytes_per_s (a slow disk or a remote store). A batched read
    sleeps once for the whole batch (one wake-up: per-block sleeps would add scheduler noise)."""

    def __init__(self, inner: Tier, bytes_per_s: float) -> None:
        super().__init__(inner.namespace, inner.name)
        self.inner, self.bytes_per_s = inner, bytes_per_s

    def contains(self, key: bytes) -> bool:
        return self.inner.contains(key)

    def get(self, key: bytes) -> BlockRecord | None:
        start = time.perf_counter()
        record = self.inner.get(key)
        if record is not None:
            time.sleep(max(0.0, record.nbytes / self.bytes_per_s - (time.perf_counter() - start)))
        return record

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        start = time.perf_counter()
        records = self.inner.get_many(keys)
        nbytes = sum(r.nbytes for r in records if r is not None)
        time.sleep(max(0.0, nbytes / self.bytes_per_s - (time.perf_counter() - start)))
        return records

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        return self.inner.put(key, record)

    def remove(self, key: bytes) -> bool:
        return self.inner.remove(key)

    def usage(self) -> TierUsage:
        return self.inner.usage()


class World:
    """The model, a throttled disk tier holding the prompts' blocks, and fresh paged caches on demand."""

    def __init__(self, model_name: str, block_size: int, disk: Path, mbps: float) -> None:
        self.lm = load_lm(model_name)
        self.block_size = block_size
        self.spec = self.lm.kv_spec(block_size, device=torch.device("cpu"))
        self.namespace = self.lm.namespace(self.spec)
        self.config = KVCacheConfig(block_size=block_size, device="cpu", dtype=self.spec.dtype)
        inner = DiskTier(self.namespace.digest, disk, 64 * 1024**3, fsync="never", name=TIER)
        self.disk = ThrottledTier(inner, mbps * 1e6)
        self.codec = make_codec("identity")

    def paged(self, tokens: int) -> KVCacheManager:
        blocks = tokens // self.block_size + 4
        return KVCacheManager(self.config, self.spec, num_blocks=blocks, namespace=self.namespace)

    def generate(self, paged: KVCacheManager, ids: Sequence[int]) -> float:
        from ultra_adaptive_kv_cache_engine.model.generation import generate_with_prefix_cache

        with torch.no_grad():
            result = generate_with_prefix_cache(self.lm.model, paged, list(ids), max_new_tokens=1, do_sample=False)
        return result.ttft_s

    def store_blocks(self, paged: KVCacheManager, ids: Sequence[int]) -> list[bytes]:
        """Write the prompt's cached blocks to the disk tier (untimed); returns their hashes in prefix order."""
        match = paged.lookup(list(ids))
        for block_id, block_hash in zip(match.block_ids, match.hashes, strict=True):
            record = encode_block(block_hash, self.namespace.digest, paged.pool.kv[block_id], self.codec)
            self.disk.inner.put(block_hash, record)
        return list(match.hashes)

    def load(self, paged: KVCacheManager, ids: Sequence[int], hashes: Sequence[bytes]) -> int:
        """Read `hashes` from the disk tier and install them as the prompt's first blocks; returns bytes read."""
        if not hashes:
            return 0
        records = self.disk.get_many(hashes)
        if any(r is None for r in records):
            raise RuntimeError("a block written to the disk tier is missing")
        blocks = torch.stack([r.tensor() for r in records])  # (k, L, 2, B, H, D)
        k, layers, _, bs, heads, dim = blocks.shape
        kv = blocks.permute(1, 2, 4, 0, 3, 5).reshape(layers, 2, heads, k * bs, dim)
        tokens = list(ids[: k * bs])
        seq = paged.new_sequence(tokens)
        paged.append(seq, tokens, [kv[layer, 0] for layer in range(layers)], [kv[layer, 1] for layer in range(layers)])
        paged.commit(seq)
        paged.free(seq)
        return sum(r.nbytes for r in records)


def load_lm(name: str):
    if name == "tiny":
        from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

        return build_tiny_llama(TinyLlamaSpec(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                                              intermediate_size=512, max_position_embeddings=8192))  # fmt: skip
    from ultra_adaptive_kv_cache_engine.model.loader import load_model

    return load_model(KVCacheConfig(device="cpu"))


def prompt(world: World, n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    vocab = int(world.lm.model.config.vocab_size)
    return torch.randint(16, vocab, (n,), generator=generator).tolist()


def timed_load(world: World, ids: list[int], hashes: Sequence[bytes]) -> tuple[float, int, float]:
    """(ttft, bytes read, load seconds) of loading `hashes` then generating."""
    paged = world.paged(len(ids))
    start = time.perf_counter()
    nbytes = world.load(paged, ids, hashes)
    loaded = time.perf_counter() - start
    return loaded + world.generate(paged, ids), nbytes, loaded


def probe(world: World, optimizer: PerformanceOptimizer, seed: int, sizes: Sequence[int]) -> None:
    """The optimizer's priors: per size, a prefill from scratch, then a load of its blocks (bandwidth, and the
    prefill of its last tokens after a cached prefix): two points per size for the prefill fit."""
    for i, n in enumerate(sizes):
        ids = prompt(world, n, seed + 1000 + i)
        paged = world.paged(n)
        optimizer.observe_prefill(0, n, world.generate(paged, ids))
        hashes = world.store_blocks(paged, ids)[: (n - 1) // world.block_size]
        ttft, nbytes, seconds = timed_load(world, ids, hashes)
        optimizer.observe_transfer(TIER, nbytes, seconds)
        optimizer.observe_prefill(len(hashes) * world.block_size, n, ttft - seconds)


def run_length(world: World, optimizer: PerformanceOptimizer, n: int, seed: int, repeats: int) -> dict[str, object]:
    ids = prompt(world, n, seed)
    bs = world.block_size
    paged = world.paged(n)
    world.generate(paged, ids)  # untimed warm-up; produces the KV that goes to the disk tier
    hashes = world.store_blocks(paged, ids)[: (n - 1) // bs]
    nbytes = world.disk.inner.get(hashes[0]).nbytes if hashes else 0
    timed_load(world, ids, hashes)  # untimed warm-up of the load path
    start = time.perf_counter()
    plan = optimizer.plan(n, bs, [CachedBlock(TIER, nbytes)] * len(hashes))
    plan_s = time.perf_counter() - start
    paths = {
        "optimizer": lambda: timed_load(world, ids, hashes[: plan.load_blocks]),
        "load": lambda: timed_load(world, ids, hashes),
        "recompute": lambda: (world.generate(world.paged(n), ids), 0, 0.0),
    }
    ttft: dict[str, list[float]] = {name: [] for name in paths}
    learned: list[tuple[int, int, float, float]] = []  # (load tokens, bytes, load s, generate s)
    for r in range(repeats):
        names = list(paths)[r % 3 :] + list(paths)[: r % 3]  # rotate the order: no path is always first
        for name in names:
            seconds, read, loaded = paths[name]()
            ttft[name].append(seconds + (plan_s if name == "optimizer" else 0.0))
            tokens = {"optimizer": plan.load_tokens, "load": len(hashes) * bs, "recompute": 0}[name]
            learned.append((tokens, read, loaded, seconds - loaded))
    for tokens, read, loaded, generate_s in learned:  # learned only after prompt n was planned
        if read:
            optimizer.observe_transfer(TIER, read, loaded)
        optimizer.observe_prefill(tokens, n, generate_s)
    medians = {name: statistics.median(values) for name, values in ttft.items()}
    cheaper = min(("load", "recompute"), key=lambda name: medians[name])
    ratios = [opt / base for opt, base in zip(ttft["optimizer"], ttft[cheaper], strict=True)]
    return {
        "prompt_tokens": n, "cached_blocks": len(hashes), "planned_load_blocks": plan.load_blocks,
        "ttft_optimizer_s": medians["optimizer"], "ttft_load_s": medians["load"],
        "ttft_recompute_s": medians["recompute"], "cheaper": cheaper, "estimated_s": plan.total_s,
        "estimated_load_s": plan.all_load_s, "estimated_recompute_s": plan.recompute_s,
        "ratio": statistics.median(ratios),
        "ratio_of_medians": medians["optimizer"] / min(medians["load"], medians["recompute"]),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two short prompts (< 1 min on 2 cores)")
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--prompts", type=int, nargs="+", default=None, help="prompt lengths in tokens")
    parser.add_argument("--disk-mbps", type=float, default=50.0, help="throttled disk read speed, MB/s")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: stable timings on a shared 2-core machine; 0: torch's)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = args.prompts or ([256, 512] if args.quick else [512, 1024, 2048, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        world = World(args.model, args.block_size, Path(tmp), args.disk_mbps)
        optimizer = PerformanceOptimizer()
        log("probing ...")
        probe(world, optimizer, args.seed, [128, 320])
        rows = []
        for n in sorted(lengths):
            log(f"prompt of {n} tokens ...")
            rows.append(run_length(world, optimizer, n, args.seed + n, repeats))
            log(f"  {rows[-1]}")
    result = {
        "model": world.lm.model_id, "disk_mbps": args.disk_mbps, "block_size": args.block_size,
        "repeats": repeats, "quick": args.quick, "max_ratio": max(r["ratio"] for r in rows),
        "goal_ratio": 1.1, "per_prompt": rows, "seconds": time.perf_counter() - started,
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    name = "compute_or_load" + ("" if args.model == "smollm2" else f"_{args.model}")
    name += "" if args.disk_mbps == 50.0 else f"_disk{args.disk_mbps:g}mbps"
    emit(name, result, save=not args.no_save)


if __name__ == "__main__":
    main()
