"""KV block write/read throughput of each tier against the raw way of moving the same bytes, same run.

Question: what does a tier cost over simply moving the bytes? For each tier, n KV blocks (default Llama-like
block: 16 layers, K and V, 16 tokens, 8 KV heads, head dim 128, bf16 = 1 MiB) are written and read back, and
every read ends where the raw read ends: the bytes in the same preallocated tensors (`outs`).
- CPU: tier write = encode (identity codec: one copy) + seal + `put`; raw = one copy of each block. Tier read =
  `get_into(key, out)`; raw = a copy into `out`. Raw copies are byte copies (memcpy speed; a bf16-typed torch
  copy runs at less than half that speed, so it would flatter the tier).
- disk: the tier writes ONE FILE PER BLOCK (no fsync on either side, page cache included). Tier write =
  `borrow_block` (no copy) + `put` (header + payload + checksum, temporary name, rename); tier read = `get_into`
  (the file read straight into `out`, checksum verified there). Two raw references: one plain file per block
  (the tier's number of files: `write_ratio`, `read_ratio`), and ONE plain file holding every block, written and
  read sequentially (`*_ratio_single_file`), which also shows what a file per block costs over a stream.
- disk_segments: the same comparisons for `SegmentDiskTier` (records appended to segment files, read with one
  `preadv` from descriptors kept open): the layout meant to reach the single-file figures.
- Redis: tier write = `borrow_block` + `put`; raw = SET of the same record bytes. Tier read = `get_into`;
  raw = GET (the bytes in hand, no tensor).
- for information: the copying write path (`write_copy`: encode + seal + put), the record read path
  (`read_record`: `get` + decode to a fresh tensor), batched reads/writes (`get_many_into` / `put_many`,
  on the tier's io threads against raw on as many threads; Redis: one pipeline each), disk with
  fsync=always against raw write+fsync, per-codec encode/decode speed, size ratio and error.
Timing (the machine may be shared): raw and tier alternate BLOCK BY BLOCK (raw on block i, tier on block
i + n/2, which comes first alternating), so both see the same load; GB/s = block bytes / median time of one
block's operation, ratio = median raw time / median tier time (1.0 = as fast as raw), so a block that was
preempted does not decide the figure. Batched figures time whole batches, alternating round by round (median of
the per-round ratios). Goal: >= 0.8 of raw for CPU and disk.
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
from ultra_adaptive_kv_cache_engine.tiers import (
    CPUTier,
    DiskTier,
    RedisTier,
    SegmentDiskTier,
    Tier,
    borrow_block,
    encode_block,
)

GOAL = 0.8
NS = hashlib.sha256(b"bench-tiers").digest()
IDENTITY = make_codec("identity")
Fn = Callable[[], object]
Op = Callable[[int], object]


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
    """Whole batches, raw and tier alternating for `repeats` rounds: best GB/s of each, median per-round ratio."""
    raw_s, tier_s = [], []
    for _ in range(repeats):
        raw_s.append(timed(raw, raw_setup))
        tier_s.append(timed(tier, tier_setup))
    ratio = statistics.median(r / t for r, t in zip(raw_s, tier_s, strict=True))
    return {f"{name}_gbps": gbps(nbytes, min(tier_s)), f"raw_{name}_gbps": gbps(nbytes, min(raw_s)),
            f"{name}_ratio": round(ratio, 3)}


def interleaved(name: str, block_bytes: int, n: int, raw: Op, tier: Op, rounds: int,
                setup: Fn | None = None) -> dict[str, float]:
    """`raw(i)` and `tier(j)` for every block, j = i + n/2 (no block's data warm from the other side), the first
    of each pair alternating; `setup` (untimed) before each round. Per-block medians."""
    raw_s: list[float] = []
    tier_s: list[float] = []
    clock = time.perf_counter
    for _ in range(rounds):
        if setup is not None:
            setup()
        for i in range(n):
            j = (i + n // 2) % n
            first, second = ((raw, i, raw_s), (tier, j, tier_s)) if i % 2 == 0 else ((tier, j, tier_s), (raw, i, raw_s))
            t0 = clock()
            first[0](first[1])
            t1 = clock()
            second[0](second[1])
            t2 = clock()
            first[2].append(t1 - t0)
            second[2].append(t2 - t1)
    raw_m, tier_m = statistics.median(raw_s), statistics.median(tier_s)
    return {f"{name}_gbps": gbps(block_bytes, tier_m), f"raw_{name}_gbps": gbps(block_bytes, raw_m),
            f"{name}_ratio": round(raw_m / tier_m, 3)}


def byte_view(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def bench_cpu(blocks: list[torch.Tensor], keys: list[bytes], rounds: int) -> dict[str, Any]:
    n, size = len(blocks), blocks[0].numel() * blocks[0].element_size()
    outs = [torch.empty_like(b) for b in blocks]
    copies: list[torch.Tensor | None] = [None] * n
    state: dict[str, Any] = {}

    def raw_write(i: int) -> None:
        copies[i] = blocks[i].view(torch.uint8).clone()

    def raw_read(i: int) -> None:
        byte_view(outs[i])[:] = byte_view(copies[i])  # type: ignore[arg-type]

    def setup() -> None:
        state["tier"] = CPUTier(NS, 4 * n * size, pin_memory=False)

    result = interleaved("write", size, n, raw_write,
                         lambda i: state["tier"].put(keys[i], encode_block(keys[i], NS, blocks[i], IDENTITY)),
                         rounds, setup)
    tier = state["tier"]
    result |= interleaved("read", size, n, raw_read, lambda i: tier.get_into(keys[i], outs[i]), rounds)
    result |= interleaved("read_record", size, n, lambda i: copies[i].clone(),  # type: ignore[union-attr]
                          lambda i: tier.get(keys[i]).tensor(), rounds)
    return result


def bench_disk(blocks: list[torch.Tensor], keys: list[bytes], rounds: int, base: Path,
               tier_cls: type[Tier] = DiskTier) -> dict[str, Any]:
    n, size = len(blocks), blocks[0].numel() * blocks[0].element_size()
    raw_dir, tier_dir, single = base / "raw", base / "tier", base / "single.raw"
    outs = [torch.empty_like(b) for b in blocks]
    state: dict[str, Any] = {}

    def fresh_raw() -> None:
        shutil.rmtree(raw_dir, ignore_errors=True)
        raw_dir.mkdir(parents=True)

    def fresh_tier(fsync: str = "never") -> None:
        shutil.rmtree(tier_dir, ignore_errors=True)
        state["tier"] = tier_cls(NS, tier_dir, 4 * n * size, fsync=fsync)

    def fresh(fsync: str = "never", stream: str | None = None) -> Fn:
        def setup() -> None:
            for f in state.pop("files", ()):
                f.close()
            fresh_raw()
            fresh_tier(fsync)
            if stream:
                state["files"] = [open(single, stream, buffering=0)]  # noqa: SIM115 (closed by the next setup)
        return setup

    def raw_write(i: int) -> None:
        fd = os.open(raw_dir / f"{i}.raw", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, byte_view(blocks[i]))
        finally:
            os.close(fd)

    def raw_write_fsync(i: int) -> None:
        fd = os.open(raw_dir / f"{i}.raw", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, byte_view(blocks[i]))
            os.fsync(fd)
        finally:
            os.close(fd)

    def raw_read(i: int) -> None:
        with open(raw_dir / f"{i}.raw", "rb", buffering=0) as f:
            f.readinto(byte_view(outs[i]))

    def tier_write(i: int) -> None:
        state["tier"].put(keys[i], borrow_block(keys[i], NS, blocks[i]))

    def stream_write(i: int) -> None:  # one file with every block, in block order
        f = state["files"][0]
        f.seek(i * size)
        f.write(byte_view(blocks[i]))

    def stream_read(i: int) -> None:
        f = state["files"][0]
        f.seek(i * size)
        f.readinto(byte_view(outs[i]))

    result = interleaved("write", size, n, raw_write, tier_write, rounds, fresh())
    result |= interleaved("write_copy", size, n, raw_write,
                          lambda i: state["tier"].put(keys[i], encode_block(keys[i], NS, blocks[i], IDENTITY)),
                          rounds, fresh())
    single_write = interleaved("single", size, n, stream_write, tier_write, rounds, fresh(stream="wb"))
    fresh(stream="rb")()  # the single file is whole; now write every block once more, each way
    for i in range(n):
        raw_write(i)
        tier_write(i)
    tier = state["tier"]
    result |= interleaved("read", size, n, raw_read, lambda i: tier.get_into(keys[i], outs[i]), rounds)
    single_read = interleaved("single", size, n, stream_read, lambda i: tier.get_into(keys[i], outs[i]), rounds)
    result |= interleaved("read_record", size, n, raw_read, lambda i: tier.get(keys[i]).tensor(), rounds)
    result |= {"raw_write_single_file_gbps": single_write["raw_single_gbps"],
               "write_ratio_single_file": single_write["single_ratio"],
               "raw_read_single_file_gbps": single_read["raw_single_gbps"],
               "read_ratio_single_file": single_read["single_ratio"]}
    result["batch_threads"] = tier.io_threads
    with ThreadPoolExecutor(tier.io_threads) as pool:
        result |= paired("batch_read", n * size, lambda: list(pool.map(raw_read, range(n))),
                         lambda: tier.get_many_into(keys, outs), rounds)
        result |= paired("batch_write", n * size, lambda: list(pool.map(raw_write, range(n))),
                         lambda: state["tier"].put_many([(k, borrow_block(k, NS, b)) for k, b in zip(keys, blocks,
                                                                                                     strict=True)]),
                         rounds, fresh_raw, fresh_tier)
    result |= interleaved("write_fsync_always", size, n, raw_write_fsync, tier_write, 1, fresh("always"))
    for f in state.pop("files", ()):
        f.close()
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


def bench_redis(blocks: list[torch.Tensor], keys: list[bytes], rounds: int, url: str) -> dict[str, Any]:
    n, size = len(blocks), blocks[0].numel() * blocks[0].element_size()
    tier = RedisTier(NS, url, prefix="bench:")
    client = redis.Redis.from_url(url)
    values = [encode_block(k, NS, b, IDENTITY).to_bytes() for k, b in zip(keys, blocks, strict=True)]
    raw_keys = [b"raw:" + k.hex().encode() for k in keys]
    outs = [torch.empty_like(b) for b in blocks]

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

    def raw_set(i: int) -> None:
        client.set(raw_keys[i], values[i])

    def raw_get(i: int) -> None:
        client.get(raw_keys[i])

    result = interleaved("write", size, n, raw_set, lambda i: tier.put(keys[i], borrow_block(keys[i], NS, blocks[i])),
                         rounds)
    result |= interleaved("write_copy", size, n, raw_set,
                          lambda i: tier.put(keys[i], encode_block(keys[i], NS, blocks[i], IDENTITY)), rounds)
    result |= interleaved("read", size, n, raw_get, lambda i: tier.get_into(keys[i], outs[i]), rounds)
    result |= interleaved("read_record", size, n, raw_get, lambda i: tier.get(keys[i]).tensor(), rounds)
    result |= paired("batch_write", n * size, raw_batch_write,
                     lambda: tier.put_many([(k, borrow_block(k, NS, b)) for k, b in zip(keys, blocks, strict=True)]),
                     rounds)
    result |= paired("batch_read", n * size, raw_batch_read, lambda: tier.get_many_into(keys, outs), rounds)
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
    parser.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default 5, quick 5)")
    parser.add_argument("--redis-url", default=None, help="use this server instead of starting redis-server")
    parser.add_argument("--dir", default=None, help="folder for the disk tier (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/tiers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)  # single-threaded copies on both sides (and no OpenMP spinning on busy cores)
    n = args.blocks or (32 if args.quick else 256)
    repeats = args.repeats or 5
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
        log("disk tier, segment layout ...")
        result["disk_segments"] = bench_disk(blocks, keys, repeats, Path(tmp), SegmentDiskTier)
        log("redis tier ...")
        run_redis(result, blocks, keys, repeats, args.redis_url, Path(tmp))
    log("codecs ...")
    result["codecs"] = bench_codecs(blocks[0], repeats)
    cpu, disk, seg = result["cpu"], result["disk"], result["disk_segments"]
    result["meets_goal"] = {
        "cpu": min(cpu["write_ratio"], cpu["read_ratio"]) >= GOAL,
        "disk_vs_file_per_block": min(disk["write_ratio"], disk["read_ratio"]) >= GOAL,
        "disk_vs_single_file": min(disk["write_ratio_single_file"], disk["read_ratio_single_file"]) >= GOAL,
        "disk_segments_vs_single_file": min(seg["write_ratio_single_file"], seg["read_ratio_single_file"]) >= GOAL,
    }
    emit("tiers", result, save=not args.no_save)


if __name__ == "__main__":
    main()
