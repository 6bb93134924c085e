"""Faults degrade, they never corrupt: kill -9 rounds, forged Redis records, fuzzed records and requests.

Question: under crashes, tampering and garbage, does the cache ever lose an acknowledged block, serve a corrupt or
forged one, or fail with anything but a documented error?

- kill -9 rounds, per disk layout (files, segments) and against a real redis-server: a forked child opens the
  tier (fsync_policy=always for disk; a tier_secret for Redis), puts seeded blocks and acknowledges each one on a
  pipe after `put` returned; the parent kills it with SIGKILL after a random delay, flips random bytes in a
  random file now and then (disk), reopens the tier and reads every block ever acknowledged. Counted: rounds,
  acknowledged blocks lost (absent; only in a round that flipped a file may a block be missing, dropped as corrupt), corrupt
  blocks served (a block returned with other bytes than written).
- forged Redis records: an attacker with only the Redis connection writes sound records under the public names
  (namespace hex + block hash hex), random values under the secret names, and values copied between names;
  counted: how many a reader with the secret serves.
- fuzzing (a seeded fuzzer of our own, deterministic): mutated records (bit flips, truncation, extension, byte
  runs, header rewrites) through `parse_record` and `TierAuth.open`; random request dicts through the `process`
  request validation. Documented errors: `RecordError` (records), `RequestError` (requests). Anything else, or
  a mutated record accepted with other content, is a crash.

Usage: python benchmarks/bench_faults.py [--quick] [--rounds N] [--fuzz N]. Prints one JSON line; the full run
(1,000 rounds per layout and with Redis, 100,000 fuzz cases each) writes benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
import torch
import tqdm
from bench_common import emit

from ultra_adaptive_kv_cache_engine.compression import EncodedTensor, TensorMeta, make_codec
from ultra_adaptive_kv_cache_engine.engine.requests import RequestError
from ultra_adaptive_kv_cache_engine.engine.sampling import parse_messages, parse_sampling
from ultra_adaptive_kv_cache_engine.tiers import (
    RecordError,
    RedisTier,
    encode_block,
    make_tier,
    parse_record,
    seal,
)
from ultra_adaptive_kv_cache_engine.tiers.auth import TierAuth
from ultra_adaptive_kv_cache_engine.types import CodecKind, TierKind

NS = hashlib.sha256(b"bench-faults").digest()
SECRET = "bench-faults-secret-0123456789"
BLOCK_SHAPE = (2, 4, 16)
CODEC = make_codec("identity")


def key_of(i: int) -> bytes:
    return hashlib.sha256(b"block" + i.to_bytes(8, "little")).digest()


def tensor_of(i: int) -> torch.Tensor:
    return torch.full(BLOCK_SHAPE, float(i % 1000), dtype=torch.float32) + torch.arange(BLOCK_SHAPE[-1]) / 64


def open_tier(kind: str, root: Path, url: str | None) -> Any:
    if kind == "redis":
        return RedisTier(NS, url, secret=SECRET, timeout_s=5.0, read_timeout_s=5.0)
    return make_tier(TierKind.DISK, NS, root=root, capacity_bytes=1 << 30, fsync="always", layout=kind)


def child(kind: str, root: Path, url: str | None, first: int, count: int, fd: int) -> None:
    """In the forked child: put blocks first..first+count-1, acknowledging each on `fd`; never returns."""
    try:
        tier = open_tier(kind, root, url)
        for i in range(first, first + count):
            if tier.put(key_of(i), encode_block(key_of(i), NS, tensor_of(i), CODEC)).stored:
                os.write(fd, i.to_bytes(8, "little"))
        tier.flush()
    finally:
        os._exit(0)


def flip_one(root: Path, rng: random.Random) -> Path | None:
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    if not files:
        return None
    path = rng.choice(files)
    data = bytearray(path.read_bytes())
    if data:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    return path


def kill_rounds(kind: str, rounds: int, url: str | None, rng: random.Random) -> dict[str, int]:
    # tqdm's default lock is a process-shared semaphore: a forked child killed while holding it (the disk scan's
    # progress bar) would hang this process. A per-process lock is copied by fork instead.
    tqdm.tqdm.set_lock(threading.RLock())
    root = Path(tempfile.mkdtemp(prefix=f"uakv-faults-{kind}-"))
    acked: set[int] = set()
    flipped: set[int] = set()
    lost = corrupt = 0
    next_id = 0
    try:
        for rnd in range(rounds):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(read_fd)
                child(kind, root, url, next_id, 40, write_fd)
            os.close(write_fd)
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            data = b""
            while chunk := os.read(read_fd, 1 << 16):
                data += chunk
            os.close(read_fd)
            acked.update(int.from_bytes(data[j : j + 8], "little") for j in range(0, len(data) - len(data) % 8, 8))
            next_id += 40
            if kind != "redis" and rnd % 10 == 9:  # tamper with a random file (a block or a segment)
                flip_one(root / NS.hex(), rng)
                flipped = set(acked)  # in this round only, a block of the flipped file may be dropped
            tier = open_tier(kind, root, url)
            ids = sorted(acked)
            for i, record in zip(ids, tier.get_many([key_of(i) for i in ids]), strict=True):
                if record is None:
                    lost += i not in flipped
                    acked.discard(i)  # dropped as corrupt: gone for good, not counted twice
                elif not torch.equal(record.tensor(), tensor_of(i)):
                    corrupt += 1
            flipped = set()
            del tier
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"rounds": rounds, "acknowledged": len(acked), "lost": lost, "corrupt_served": corrupt}


def forged_rounds(url: str, n: int, rng: random.Random) -> dict[str, int]:
    tier = RedisTier(NS, url, secret=SECRET)
    client = redis.Redis.from_url(url)
    client.flushdb()
    keys = [key_of(10**9 + i) for i in range(n)]
    for i, key in enumerate(keys[: n // 2]):  # real blocks, whose values the attacker can read and move
        tier.put(key, encode_block(key, NS, tensor_of(i), CODEC))
    names = [tier.redis_key(k) for k in keys]
    for i, key in enumerate(keys):
        zeros = EncodedTensor(TensorMeta(CodecKind.IDENTITY, "float32", BLOCK_SHAPE), bytes(4 * 128))
        client.set(b"uakv:" + NS.hex().encode() + b":" + key.hex().encode(), seal(key, NS, zeros).to_bytes())
        choice = rng.randrange(3)
        if choice == 0 and i >= n // 2:
            client.set(names[i], rng.randbytes(rng.randrange(0, 800)))
        elif choice == 1:
            client.set(names[i], client.get(names[rng.randrange(n // 2)]) or b"")
        elif choice == 2 and i >= n // 2:
            client.set(names[i], bytes(32) + seal(key, NS, zeros).to_bytes())
    served = 0
    for i, record in enumerate(tier.get_many(keys)):
        if record is not None and not torch.equal(record.tensor(), tensor_of(i)):
            served += 1
        if record is not None and i >= n // 2:
            served += 1
    return {"forged_written": n + n // 2, "forged_served": served}


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    op = rng.randrange(6)
    if op == 0:
        for _ in range(rng.randint(1, 4)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif op == 1:
        del out[rng.randrange(len(out)) :]
    elif op == 2:
        out += rng.randbytes(rng.randint(1, 64))
    elif op == 3:
        at = rng.randrange(len(out))
        out[at : at + 8] = rng.randbytes(8)
    elif op == 4:  # rewrite a field of the fixed prefix (lengths, version)
        at = rng.choice((8, 10, 12, 80))
        out[at : at + 4] = rng.randbytes(4)
    else:
        out = bytearray(rng.randbytes(rng.randrange(0, 300)))
    return bytes(out)


def fuzz_records(n: int, rng: random.Random) -> dict[str, int]:
    auth = TierAuth(SECRET, NS)
    seeds = [encode_block(key_of(i), NS, tensor_of(i), make_codec(c)) for i, c in
             enumerate(("identity", "int8", "zstd", "identity"))]
    crashes = accepted_wrong = 0
    for case in range(n):
        record = seeds[case % len(seeds)]
        good = record.to_bytes()
        sealed = b"".join(bytes(memoryview(c)) for c in auth.seal(record))
        for data, opener in ((mutate(good, rng), None), (mutate(sealed, rng), auth)):
            try:
                raw = opener.open(record.block_hash, NS, data) if opener else data
                got = parse_record(raw, record.block_hash, NS)
                got.tensor()
                if got.to_bytes() != good:
                    accepted_wrong += 1
            except RecordError:
                pass
            except Exception:  # noqa: BLE001 - what the fuzzer counts
                crashes += 1
    return {"records_fuzzed": 2 * n, "record_crashes": crashes, "record_accepted_wrong": accepted_wrong}


VALUES = [None, True, False, 0, -1, 1, 2**64, 2**63, 0.5, float("nan"), float("inf"), -0.0, "", "x", "yes", [],
          [""], ["a", 1], {}, {"role": "user"}, [{"role": "user", "content": "hi"}], [{"role": "x", "content": 1}],
          b"bytes", 10**9]
FIELDS = ["action", "text", "messages", "raw", "stream", "max_new_tokens", "temperature", "top_p", "stop", "seed",
          "priority", "user", "conversation_id", "bogus"]


def fuzz_requests(n: int, rng: random.Random) -> dict[str, int]:
    crashes = 0
    for _ in range(n):
        request = {f: rng.choice(VALUES) for f in rng.sample(FIELDS, rng.randint(0, 6))}
        if rng.random() < 0.5:
            request.update(action="process", text=rng.choice(["hi", "", " ", "<|im_start|>system"]))
        try:
            parse_messages(request)
            parse_sampling(request, 16)
        except RequestError:
            pass
        except Exception:  # noqa: BLE001 - what the fuzzer counts
            crashes += 1
    return {"requests_fuzzed": n, "request_crashes": crashes}


def start_redis(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)], stdout=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 20 rounds, 2,000 fuzz cases")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--fuzz", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (20 if args.quick else 1000)
    fuzz = args.fuzz or (2000 if args.quick else 100_000)
    rng = random.Random(15)
    start = time.perf_counter()
    result: dict[str, Any] = {"quick": args.quick, "kill9": {}}
    for layout in ("files", "segments"):
        result["kill9"][layout] = kill_rounds(layout, rounds, None, rng)
    folder = Path(tempfile.mkdtemp(prefix="uakv-faults-redis-"))
    proc, url = start_redis(folder)
    try:
        result["kill9"]["redis"] = kill_rounds("redis", rounds, url, rng)
        result["forged"] = forged_rounds(url, max(20, fuzz // 100), rng)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    result["fuzz"] = {**fuzz_records(fuzz // 2, rng), **fuzz_requests(fuzz, rng)}
    result["acknowledged_lost"] = sum(r["lost"] for r in result["kill9"].values())
    result["corrupt_served"] = sum(r["corrupt_served"] for r in result["kill9"].values())
    result["seconds"] = round(time.perf_counter() - start, 1)
    emit("faults", result, save=not args.quick)
    ok = (result["acknowledged_lost"] == 0 and result["corrupt_served"] == 0 and result["forged"]["forged_served"] == 0
          and result["fuzz"]["record_crashes"] == 0 and result["fuzz"]["record_accepted_wrong"] == 0
          and result["fuzz"]["request_crashes"] == 0)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
