"""KV block write/read throughput of each tier against the raw way of moving the same bytes, same run.

Question: what does a tier cost over simply copying the bytes? For each tier, n KV blocks (default Llama-like
block: 16 layers, K and V, 16 tokens, 8 KV heads, head dim 128, bf16 = 1 MiB) are written and read back:
- tier write = encode (identity codec) + seal + `put`; tier read = `get` (+ verification on disk/Redis) + decode
  to a tensor. Both ways end with the same thing the raw way has: bytes stored / a tensor in hand.
- raw baselines: CPU = a plain memory copy of the tensor (write and read); disk = a plain sequential write of
  the tensor's bytes to one file per block and a read back into a preallocated tensor (no fsync on either
  side, page cache included); Redis = plain SET / GET of the same bytes on the same server.
- for information: put/get alone on pre-sealed records (`*_only`), disk with fsync=always against raw
  write+fsync, batched disk reads and writes (`get_many` / `put_many` on the tier's io threads against raw
  reads / writes on as many threads), and per-codec encode/decode speed, size ratio and error.
GB/s = 1e9 bytes of KV per second, best of `--repeats`; ratios are tier / raw (1.0 = as fast as raw).
Goal: >= 0.8 of raw for CPU and disk. Single thread on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, DiskTier, RedisTier, encode_block

GOAL = 0.8
NS = hashlib.sha256(b"bench-tiers").digest()
IDENTITY = make_codec("identity")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def best(fn: Callable[[], object], repeats: int, setup: Callable[[], object] | None = None) -> float:
    """Fastest of `repeats` runs of `fn` (seconds); `setup` runs untimed before each."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def side(name: str, nbytes: int, tier_s: float, raw_s: float) -> dict[str, float]:
    return {f"{name}_gbps": gbps(nbytes, tier_s), f"raw_{name}_gbps": gbps(nbytes, raw_s),
            f"{name}_ratio": round(raw_s / tier_s, 3)}


def paired(
    raw: Callable[[], object], tier: Callable[[], object], repeats: int,
    raw_setup: Callable[[], object] | None = None, tier_setup: Callable[[], object] | None = None,
) -> tuple[float, float]:
    """Best (raw, tier) seconds over `repeats` rounds, raw and tier alternating so both see the same load."""
    raw_s, tier_s = [], []
    for _ in range(repeats):
        raw_s.append(best(raw, 1, raw_setup))
        tier_s.append(best(tier, 1, tier_setup))
    return min(raw_s), min(tier_s)


def bench_cpu(blocks: list[torch.Tensor], keys: list[bytes], repeats: int) -> dict[str, Any]:
    nbytes = sum(b.numel() * b.element_size() for b in blocks)
    state: dict[str, Any] = {}

    def tier_write() -> None:
        tier = state["tier"]
        for k, b in zip(keys, blocks, strict=True):
            tier.put(k, encode_block(k, NS, b, IDENTITY))

    raw_w, tier_w = paired(lambda: state.__setitem__("copies", [b.clone() for b in blocks]), tier_write, repeats,
                           tier_setup=lambda: state.__setitem__("tier", CPUTier(NS, 4 * nbytes, pin_memory=False)))
    raw_r, tier_r = paired(lambda: [c.clone() for c in state["copies"]],
                           lambda: [state["tier"].get(k).tensor() for k in keys], repeats)
    return {**side("write", nbytes, tier_w, raw_w), **side("read", nbytes, tier_r, raw_r)}


def _raw_file_write(folder: Path, blocks: list[torch.Tensor], fsync: bool, first: int = 0) -> None:
    for i, b in enumerate(blocks, first):
        with open(folder / f"{i}.raw", "wb", buffering=0) as f:
            f.write(memoryview(b.view(torch.uint8).numpy()))
            if fsync:
                os.fsync(f.fileno())


def _raw_file_read_one(folder: Path, i: int, out: torch.Tensor) -> None:
    with open(folder / f"{i}.raw", "rb", buffering=0) as f:
        f.readinto(memoryview(out.view(torch.uint8).numpy()))


def bench_disk(blocks: list[torch.Tensor], keys: list[bytes], repeats: int, base: Path) -> dict[str, Any]:
    nbytes = sum(b.numel() * b.element_size() for b in blocks)
    raw_dir, tier_dir = base / "raw", base / "tier"
    state: dict[str, Any] = {}

    def fresh_raw() -> None:
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir(parents=True)

    def fresh_tier(fsync: str = "never") -> Callable[[], None]:
        def setup() -> None:
            shutil.rmtree(tier_dir, ignore_errors=True)
            state["tier"] = DiskTier(NS, tier_dir, 4 * nbytes, fsync=fsync)
        return setup

    def tier_write() -> None:
        for k, b in zip(keys, blocks, strict=True):
            state["tier"].put(k, encode_block(k, NS, b, IDENTITY))

    outs = [torch.empty_like(b) for b in blocks]
    raw_w, tier_w = paired(lambda: _raw_file_write(raw_dir, blocks, False), tier_write, repeats, fresh_raw,
                           fresh_tier())
    raw_r, tier_r = paired(lambda: [_raw_file_read_one(raw_dir, i, o) for i, o in enumerate(outs)],
                           lambda: [state["tier"].get(k).tensor() for k in keys], repeats)
    tier = state["tier"]
    records = [tier.get(k) for k in keys]
    get_only = best(lambda: [tier.get(k) for k in keys], repeats)

    def put_only() -> None:
        for r in records:
            state["tier"].put(r.block_hash, r)

    put_only_s = best(put_only, repeats, fresh_tier())
    with ThreadPoolExecutor(tier.io_threads) as pool:
        raw_b, tier_b = paired(
            lambda: list(pool.map(lambda i: _raw_file_read_one(raw_dir, i, outs[i]), range(len(outs)))),
            lambda: [r.tensor() for r in tier.get_many(keys)], repeats)
        raw_bw, tier_bw = paired(
            lambda: list(pool.map(lambda i: _raw_file_write(raw_dir, blocks[i : i + 1], False, i), range(len(blocks)))),
            lambda: state["tier"].put_many([(k, encode_block(k, NS, b, IDENTITY)) for k, b in zip(keys, blocks, strict=True)]),
            repeats, fresh_raw, fresh_tier())
    raw_sync, tier_sync = paired(lambda: _raw_file_write(raw_dir, blocks, True), tier_write, 1, fresh_raw,
                                 fresh_tier("always"))
    return {**side("write", nbytes, tier_w, raw_w), **side("read", nbytes, tier_r, raw_r),
            "put_only_gbps": gbps(nbytes, put_only_s), "get_only_gbps": gbps(nbytes, get_only),
            "batch_threads": tier.io_threads, **side("batch_read", nbytes, tier_b, raw_b),
            **side("batch_write", nbytes, tier_bw, raw_bw),
            **side("write_fsync_always", nbytes, tier_sync, raw_sync)}


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], int] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                             "no", "--dir", str(folder), "--daemonize", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, port
        except redis.exceptions.ConnectionError:
            time.sleep(0.01)
    proc.kill()
    return None


def bench_redis(blocks: list[torch.Tensor], keys: list[bytes], repeats: int, url: str) -> dict[str, Any]:
    nbytes = sum(b.numel() * b.element_size() for b in blocks)
    tier = RedisTier(NS, url, prefix="bench:")
    client = redis.Redis.from_url(url)
    values = [encode_block(k, NS, b, IDENTITY).to_bytes() for k, b in zip(keys, blocks, strict=True)]
    raw_keys = [b"raw:" + k.hex().encode() for k in keys]

    def raw_write() -> None:
        for k, v in zip(raw_keys, values, strict=True):
            client.set(k, v)

    def tier_write() -> None:
        for k, b in zip(keys, blocks, strict=True):
            tier.put(k, encode_block(k, NS, b, IDENTITY))

    raw_w, tier_w = paired(raw_write, tier_write, repeats)
    raw_r, tier_r = paired(lambda: [client.get(k) for k in raw_keys], lambda: [tier.get(k).tensor() for k in keys],
                           repeats)
    return {**side("write", nbytes, tier_w, raw_w), **side("read", nbytes, tier_r, raw_r)}


def bench_codecs(block: torch.Tensor, repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    nbytes = block.numel() * block.element_size()
    for kind in ("identity", "int8", "fp8", "int4", "zstd"):
        try:
            codec = make_codec(kind)
        except ValueError as exc:
            out[kind] = {"skipped": str(exc)}
            continue
        encoded = codec.encode(block)
        decoded = codec.decode(encoded.payload, encoded.meta)
        err = float((decoded.float() - block.float()).abs().max() / block.float().abs().max())
        out[kind] = {
            "encode_gbps": gbps(nbytes, best(lambda c=codec: c.encode(block), repeats)),
            "decode_gbps": gbps(nbytes, best(lambda c=codec, e=encoded: c.decode(e.payload, e.meta), repeats)),
            "size_ratio": round(encoded.nbytes / nbytes, 4),
            "max_error_rel_absmax": round(err, 6),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and repeats (< 1 minute on 2 cores)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per pass (default 256, quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="passes; the best counts (default 5, quick 3)")
    parser.add_argument("--redis-url", default=None, help="use this server instead of starting redis-server")
    parser.add_argument("--dir", default=None, help="folder for the disk tier (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/tiers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-threaded copies on both sides (and no OpenMP spinning on busy cores)
    n = args.blocks or (32 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 5)
    gen = torch.Generator().manual_seed(args.seed)
    shape = (16, 2, 16, 8, 128)
    blocks = [torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(n)]
    keys = [hashlib.sha256(f"{args.seed}:{i}".encode()).digest() for i in range(n)]
    result: dict[str, Any] = {"question": "tier write/read GB/s of KV blocks vs raw copy/file/SET-GET, same run",
                              "seed": args.seed, "quick": args.quick, "blocks": n, "repeats": repeats,
                              "block_shape": list(shape), "block_bytes": blocks[0].numel() * 2, "goal_ratio": GOAL}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        log("cpu tier ...")
        result["cpu"] = bench_cpu(blocks, keys, repeats)
        log("disk tier ...")
        result["disk"] = bench_disk(blocks, keys, repeats, Path(tmp))
        log("redis tier ...")
        server = None if args.redis_url else start_redis(Path(tmp))
        if args.redis_url or server:
            url = args.redis_url or f"redis://127.0.0.1:{server[1]}/0"
            try:
                result["redis"] = bench_redis(blocks, keys, repeats, url)
            finally:
                if server:
                    server[0].kill()
                    server[0].wait()
        else:
            result["redis"] = {"skipped": "redis-server not installed and no --redis-url"}
    log("codecs ...")
    result["codecs"] = bench_codecs(blocks[0], repeats)
    result["meets_goal"] = {t: min(result[t]["write_ratio"], result[t]["read_ratio"]) >= GOAL for t in ("cpu", "disk")}
    emit("tiers", result, save=not args.no_save)


if __name__ == "__main__":
    main()
