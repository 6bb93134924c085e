"""KV block write/read throughput of each tier against the raw way of moving the same bytes, same run.

Question: what does a tier cost over simply moving the bytes? For each tier, n KV blocks (default Llama-like
block: 16 layers, K and V, 16 tokens, 8 KV heads, head dim 128, bf16 = 1 MiB) are written and read back, and
every read ends where the raw read ends: the bytes in the same preallocated tensors (`outs`).
- CPU: tier write = encode (identity codec: one copy) + seal + `put`; raw = one copy of each block. Tier read =
  `get_into(key, out)`; raw = `out.copy_(block)`.
- disk (one file per block, no fsync on either side, page cache included): tier write = `borrow_block` (no copy)
  + `put` (header + payload + checksum, temporary name, rename); raw = one plain file per block (the tier's
  number of files). Tier read = `get_into` (the file read straight into `out`, checksum verified there);
  raw = `readinto(out)` of each plain file. Second reference: ONE plain file with every block, written and read
  sequentially (`*_ratio_single_file`): what one file per block costs over a stream.
- Redis: tier write = `borrow_block` + `put`; raw = SET of the same record bytes. Tier read = `get_into`;
  raw = GET (the bytes in hand, no tensor).
- for information: the copying write path (`write_copy`: encode + seal + put), the record read path
  (`read_record`: `get` + decode to a fresh tensor), batched reads/writes (`get_many_into` / `put_many`,
  on the tier's io threads against raw on as many threads; Redis: one pipeline each), disk with
  fsync=always against raw write+fsync, per-codec encode/decode speed, size ratio and error.
Raw and tier alternate round by round. GB/s = 1e9 bytes of KV per second, best round; ratio = median over
rounds of raw time / tier time in the same round (1.0 = as fast as raw). Goal: >= 0.8 of raw for CPU and disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import statistics
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
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, DiskTier, RedisTier, borrow_block, encode_block

GOAL = 0.8
NS = hashlib.sha256(b"bench-tiers").digest()
IDENTITY = make_codec("identity")
Fn = Callable[[], object]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn: Fn, setup: Fn | None = None) -> float:
    if setup is not None:
        setup()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gbps(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 3)


def paired(name: str, nbytes: int, raw: Fn, tier: Fn, repeats: int, raw_setup: Fn | None = None,
           tier_setup: Fn | None = None) -> dict[str, float]:
    """Raw and tier alternating for `repeats` rounds: best GB/s of each, median of the per-round ratios."""
    raw_s, tier_s = [], []
    for _ in range(repeats):
        raw_s.append(timed(raw, raw_setup))
        tier_s.append(timed(tier, tier_setup))
    ratio = statistics.median(r / t for r, t in zip(raw_s, tier_s, strict=True))
    return {f"{name}_gbps": gbps(nbytes, min(tier_s)), f"raw_{name}_gbps": gbps(nbytes, min(raw_s)),
            f"{name}_ratio": round(ratio, 3)}


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def bench_cpu(blocks: list[torch.Tensor], keys: list[bytes], repeats: int) -> dict[str, Any]:
    nbytes = sum(b.numel() * b.element_size() for b in blocks)
    outs = [torch.empty_like(b) for b in blocks]
    state: dict[str, Any] = {}

    def tier_write() -> None:
        for k, b in zip(keys, blocks, strict=True):
            state["tier"].put(k, encode_block(k, NS, b, IDENTITY))

    result = paired("write", nbytes, lambda: state.__setitem__("copies", [b.clone() for b in blocks]), tier_write,
                    repeats, tier_setup=lambda: state.__setitem__("tier", CPUTier(NS, 4 * nbytes, pin_memory=False)))
    tier = state["tier"]
    result |= paired("read", nbytes, lambda: [o.copy_(c) for o, c in zip(outs, state["copies"], strict=True)],
                     lambda: [tier.get_into(k, o) for k, o in zip(keys, outs, strict=True)], repeats)
    result |= paired("read_record", nbytes, lambda: [c.clone() for c in state["copies"]],
                     lambda: [tier.get(k).tensor() for k in keys], repeats)
    return result


def _raw_write(folder: Path, blocks: list[torch.Tensor], fsync: bool, first: int = 0) -> None:
    for i, b in enumerate(blocks, first):
        fd = os.open(folder / f"{i}.raw", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, byte_view(b))
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def _raw_read(folder: Path, i: int, out: torch.Tensor) -> None:
    with open(folder / f"{i}.raw", "rb", buffering=0) as f:
        f.readinto(byte_view(out))


def _single_write(path: Path, blocks: list[torch.Tensor]) -> None:
    with open(path, "wb", buffering=0) as f:
        for b in blocks:
            f.write(byte_view(b))


def _single_read(path: Path, outs: list[torch.Tensor]) -> None:
    with open(path, "rb", buffering=0) as f:
        for out in outs:
            f.readinto(byte_view(out))


def bench_disk(blocks: list[torch.Tensor], keys: list[bytes], repeats: int, base: Path) -> dict[str, Any]:
    nbytes = sum(b.numel() * b.element_size() for b in blocks)
    raw_dir, tier_dir, single = base / "raw", base / "tier", base / "single.raw"
    outs = [torch.empty_like(b) for b in blocks]
    state: dict[str, Any] = {}
    pairs = list(zip(keys, blocks, strict=True))

    def fresh_raw() -> None:
        shutil.rmtree(raw_dir, ignore_errors=True)
        single.unlink(missing_ok=True)
        raw_dir.mkdir(parents=True)

    def fresh_tier(fsync: str = "never") -> Fn:
        def setup() -> None:
            shutil.rmtree(tier_dir, ignore_errors=True)
            state["tier"] = DiskTier(NS, tier_dir, 4 * nbytes, fsync=fsync)
        return setup

    def tier_write() -> None:
        for k, b in pairs:
            state["tier"].put(k, borrow_block(k, NS, b))

    def tier_write_copy() -> None:
        for k, b in pairs:
            state["tier"].put(k, encode_block(k, NS, b, IDENTITY))

    def tier_read() -> None:
        for k, o in zip(keys, outs, strict=True):
            state["tier"].get_into(k, o)

    raw_files = lambda: _raw_write(raw_dir, blocks, False)  # noqa: E731
    result = paired("write", nbytes, raw_files, tier_write, repeats, fresh_raw, fresh_tier())
    result |= paired("write_single_file", nbytes, lambda: _single_write(single, blocks), tier_write, repeats,
                     fresh_raw, fresh_tier())
    result |= paired("write_copy", nbytes, raw_files, tier_write_copy, repeats, fresh_raw, fresh_tier())
    fresh_raw()
    raw_files()
    _single_write(single, blocks)
    result |= paired("read", nbytes, lambda: [_raw_read(raw_dir, i, o) for i, o in enumerate(outs)], tier_read,
                     repeats)
    result |= paired("read_single_file", nbytes, lambda: _single_read(single, outs), tier_read, repeats)
    result |= paired("read_record", nbytes, lambda: [_raw_read(raw_dir, i, o) for i, o in enumerate(outs)],
                     lambda: [state["tier"].get(k).tensor() for k in keys], repeats)
    tier = state["tier"]
    result["batch_threads"] = tier.io_threads
    with ThreadPoolExecutor(tier.io_threads) as pool:
        result |= paired("batch_read", nbytes,
                         lambda: list(pool.map(lambda i: _raw_read(raw_dir, i, outs[i]), range(len(outs)))),
                         lambda: tier.get_many_into(keys, outs), repeats)
        result |= paired("batch_write", nbytes,
                         lambda: list(pool.map(lambda i: _raw_write(raw_dir, blocks[i : i + 1], False, i),
                                               range(len(blocks)))),
                         lambda: state["tier"].put_many([(k, borrow_block(k, NS, b)) for k, b in pairs]),
                         repeats, fresh_raw, fresh_tier())
    result |= paired("write_fsync_always", nbytes, lambda: _raw_write(raw_dir, blocks, True), tier_write, 1,
                     fresh_raw, fresh_tier("always"))
    for name in ("write", "read"):
        result[f"{name}_ratio_single_file"] = result.pop(f"{name}_single_file_ratio")
        result.pop(f"{name}_single_file_gbps")
    return result


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
    outs = [torch.empty_like(b) for b in blocks]
    pairs = list(zip(keys, blocks, strict=True))

    def raw_write() -> None:
        for k, v in zip(raw_keys, values, strict=True):
            client.set(k, v)

    def raw_batch_write() -> None:
        pipe = client.pipeline(transaction=False)
        for k, v in zip(raw_keys, values, strict=True):
            pipe.set(k, v)
        pipe.execute()

    def raw_batch_read() -> None:
        pipe = client.pipeline(transaction=False)
        for k in raw_keys:
            pipe.get(k)
        pipe.execute()

    result = paired("write", nbytes, raw_write, lambda: [tier.put(k, borrow_block(k, NS, b)) for k, b in pairs],
                    repeats)
    result |= paired("write_copy", nbytes, raw_write,
                     lambda: [tier.put(k, encode_block(k, NS, b, IDENTITY)) for k, b in pairs], repeats)
    result |= paired("read", nbytes, lambda: [client.get(k) for k in raw_keys],
                     lambda: [tier.get_into(k, o) for k, o in zip(keys, outs, strict=True)], repeats)
    result |= paired("read_record", nbytes, lambda: [client.get(k) for k in raw_keys],
                     lambda: [tier.get(k).tensor() for k in keys], repeats)
    result |= paired("batch_write", nbytes, raw_batch_write,
                     lambda: tier.put_many([(k, borrow_block(k, NS, b)) for k, b in pairs]), repeats)
    result |= paired("batch_read", nbytes, raw_batch_read, lambda: tier.get_many_into(keys, outs), repeats)
    return result


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
            "encode_gbps": gbps(nbytes, min(timed(lambda c=codec: c.encode(block)) for _ in range(repeats))),
            "decode_gbps": gbps(nbytes, min(timed(lambda c=codec, e=encoded: c.decode(e.payload, e.meta))
                                            for _ in range(repeats))),
            "size_ratio": round(encoded.nbytes / nbytes, 4),
            "max_error_rel_absmax": round(err, 6),
        }
    return out


def run_redis(result: dict[str, Any], blocks: list[torch.Tensor], keys: list[bytes], repeats: int,
              url: str | None, folder: Path) -> None:
    server = None if url else start_redis(folder)
    if not (url or server):
        result["redis"] = {"skipped": "redis-server not installed and no --redis-url"}
        return
    try:
        result["redis"] = bench_redis(blocks, keys, repeats, url or f"redis://127.0.0.1:{server[1]}/0")
    finally:
        if server:
            server[0].kill()
            server[0].wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer blocks and rounds (< 1 minute on 2 cores)")
    parser.add_argument("--blocks", type=int, default=None, help="blocks per pass (default 256, quick 32)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default 7, quick 5)")
    parser.add_argument("--redis-url", default=None, help="use this server instead of starting redis-server")
    parser.add_argument("--dir", default=None, help="folder for the disk tier (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/tiers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-threaded copies on both sides (and no OpenMP spinning on busy cores)
    n = args.blocks or (32 if args.quick else 256)
    repeats = args.repeats or (5 if args.quick else 7)
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
        run_redis(result, blocks, keys, repeats, args.redis_url, Path(tmp))
    log("codecs ...")
    result["codecs"] = bench_codecs(blocks[0], repeats)
    ratios = {t: min(result[t]["write_ratio"], result[t]["read_ratio"]) for t in ("cpu", "disk")}
    result["meets_goal"] = {t: r >= GOAL for t, r in ratios.items()}
    disk = result["disk"]
    result["meets_goal"]["disk_vs_single_file"] = min(disk["write_ratio_single_file"],
                                                      disk["read_ratio_single_file"]) >= GOAL
    emit("tiers", result, save=not args.no_save)


if __name__ == "__main__":
    main()
