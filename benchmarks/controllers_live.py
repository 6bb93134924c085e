"""The live section of bench_controllers: a multi-turn conversation workload replayed through the REAL cache
manager (block pool + prefix index + a small CPU tier + a disk tier under a temporary folder), with random KV
and no model: per request `new_sequence` -> `append` the KV of the tokens not cached (prompt and answer) ->
`commit` -> `free`, then `controllers.on_request(...)`; `controllers.step()` runs once per simulated second.

Variants, each on a fresh manager and folder, same seeded workload: all controllers off, prefetcher on,
autoscaler on, all on. Per variant: where the blocks of each prompt were found (pool, cpu, disk, computed), the
fast tier's share of the blocks found below the pool, the pool+tier hit tokens, and the CPU tier's mean
capacity (what the autoscaler gives back), each also as a ratio against off.

Determinism: each request's tier writes are waited for (`manager.persist()`, fsync never) and each round's
background promotions too (`BlockSource.wait`), so a replay does not depend on thread timing.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.cache.tier_controls import record_bytes
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig, TierConfig
from ultra_adaptive_kv_cache_engine.engine.controllers import Controllers
from ultra_adaptive_kv_cache_engine.memory import KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)
VOCAB = 32000
SYSTEM_TOKENS = 48  # one system prompt shared by every conversation
VARIANTS = {
    "off": {},
    "prefetcher": {"enable_prefetcher": True},
    "autoscaler": {"enable_autoscaler": True},
    "all": {"enable_prefetcher": True, "enable_autoscaler": True, "enable_metrics": True},
}


@dataclass(frozen=True)
class Turn:
    at: float
    conversation: int
    user: tuple[int, ...]
    answer: tuple[int, ...]
    last: bool


@dataclass(frozen=True)
class LiveSizes:
    conversations: int
    pool_blocks: int
    cpu_blocks: int
    disk_blocks: int
    arrival_s: float


QUICK = LiveSizes(conversations=40, pool_blocks=64, cpu_blocks=64, disk_blocks=4096, arrival_s=240.0)
FULL = LiveSizes(conversations=160, pool_blocks=96, cpu_blocks=128, disk_blocks=16384, arrival_s=900.0)


def workload(rng: random.Random, sizes: LiveSizes) -> list[Turn]:
    """Conversations arriving denser early (start = arrival_s * u**2), 3 to 6 turns each, think times around
    30 s (lognormal), 8 to 40 user tokens and 8 to 64 answer tokens per turn (a conversation ends under 44
    blocks, within the pool); sorted by time."""
    turns: list[Turn] = []
    for cid in range(sizes.conversations):
        at = sizes.arrival_s * rng.random() ** 2
        count = rng.randint(3, 6)
        for t in range(count):
            user = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(8, 40)))
            answer = tuple(rng.randrange(VOCAB) for _ in range(rng.randint(8, 64)))
            turns.append(Turn(at, cid, user, answer, t == count - 1))
            at += rng.lognormvariate(math.log(30.0), 0.3)
    return sorted(turns, key=lambda t: (t.at, t.conversation))


def build(root: Path, sizes: LiveSizes, switches: dict[str, bool]) -> tuple[KVCacheManager, int]:
    """The manager (pool + CPU tier + disk tier, lru everywhere) and one block's record size in the tiers."""
    block_bytes = SPEC.bytes_per_block
    config = KVCacheConfig(
        block_size=SPEC.block_size, device="cpu", cache_strategy="lru", persistence_path=str(root),
        fsync_policy="never", tiers=(TierConfig("cpu", sizes.cpu_blocks * block_bytes),
                                     TierConfig("disk", sizes.disk_blocks * block_bytes)),
        **{"enable_prefetcher": False, "enable_autoscaler": False, "enable_metrics": False, **switches},
    )  # fmt: skip
    namespace = default_namespace(config, SPEC)
    manager = KVCacheManager.from_config(config, SPEC, namespace, num_blocks=sizes.pool_blocks)
    return manager, record_bytes(namespace.digest, manager.kv.shape[1:], manager.kv.dtype, make_codec("identity"))


def random_kv(tokens: int, generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (SPEC.num_kv_heads, tokens, SPEC.head_dim)
    keys = [torch.randn(shape, generator=generator) for _ in range(SPEC.num_layers)]
    return keys, [torch.randn(shape, generator=generator) for _ in range(SPEC.num_layers)]


def hit_tiers(manager: KVCacheManager, source: Any, tokens: list[int], cached_limit: int) -> list[str | None]:
    """Where each full block of the prompt is now: "pool" for the cached run, then the tier of each block of the
    leading run found below it, None after (what `new_sequence` will reuse, promote and compute)."""
    hashes = manager.hash_prompt(tokens)
    usable = cached_limit // SPEC.block_size
    in_pool = min(usable, manager.lookup(tokens).num_tokens // SPEC.block_size)
    tiers: list[str | None] = ["pool"] * in_pool
    for h in hashes[in_pool:usable]:
        where = source.tier_of(h)
        if where is None:
            break
        tiers.append(where)
    return tiers + [None] * (len(hashes) - len(tiers))


def replay(turns: list[Turn], sizes: LiveSizes, switches: dict[str, bool], root: Path, seed: int) -> dict[str, Any]:
    manager, block_bytes = build(root, sizes, switches)
    controls, source = manager.tier_controls(), manager.block_source()  # what the engine hands its controllers
    assert source is not None and [c.name for c in controls] == ["cpu", "disk"]
    clock = Clock()
    controllers = Controllers(manager.config, controls, source, block_bytes, clock)
    generator = torch.Generator().manual_seed(seed)
    history: dict[int, list[int]] = {}
    found = {"pool": 0, "cpu": 0, "disk": 0, "computed": 0}
    cpu_capacity: list[int] = []
    next_round = 0.0
    for turn in turns:
        while next_round <= turn.at:
            clock.now = next_round
            controllers.step()
            source.wait()
            cpu_capacity.append(controls[0].usage().capacity_bytes or 0)
            next_round += 1.0
        clock.now = turn.at
        system = list(range(SYSTEM_TOKENS))
        prompt = history.get(turn.conversation, system) + list(turn.user)
        tiers = hit_tiers(manager, source, prompt, len(prompt) - 1)
        seq = manager.new_sequence(prompt, max_cached_tokens=len(prompt) - 1)
        hits = manager.sequence_hits(seq)
        reused = (hits.pool_tokens + hits.tier_tokens) // SPEC.block_size
        tiers = tiers[:reused] + [None] * (len(tiers) - reused)  # what was reused, exactly
        if tiers.count("pool") * SPEC.block_size != hits.pool_tokens:
            raise RuntimeError(f"pool hits {tiers.count('pool')} blocks located, {hits.pool_tokens} tokens reused")
        cached = manager.num_cached_tokens(seq)
        keys, values = random_kv(len(prompt) - cached, generator)
        manager.append(seq, prompt[cached:], keys, values)
        keys, values = random_kv(len(turn.answer), generator)
        manager.append(seq, list(turn.answer), keys, values)
        manager.commit(seq)
        manager.free(seq)
        manager.persist()  # this request's tier writes are done before the next request
        for where in tiers:
            found["computed" if where is None else where] += 1
        conversation = None if turn.last else str(turn.conversation)
        controllers.on_request(conversation, manager.hash_prompt(prompt), tiers, None, len(prompt), cached)
        history[turn.conversation] = prompt + list(turn.answer)
    stats = controllers.stats()
    manager.close()
    below = found["cpu"] + found["disk"]
    looked_up = sum(found.values())
    return {
        "blocks_found": found,
        "fast_tier_share_below_pool": found["cpu"] / below if below else 0.0,
        "pool_or_cpu_block_rate": (found["pool"] + found["cpu"]) / looked_up if looked_up else 0.0,
        "hit_tokens": (found["pool"] + below) * SPEC.block_size,
        "tier_hit_tokens": below * SPEC.block_size,
        "cpu_capacity_mean_bytes": sum(cpu_capacity) / max(1, len(cpu_capacity)),
        "promoted_blocks": (stats["prefetcher"] or {}).get("promoted_blocks", 0),
        "resizes": (stats["autoscaler"] or {}).get("resizes", 0),
        "rounds": stats["rounds"],
    }


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def bench_live(rng: random.Random, quick: bool, seed: int) -> dict[str, Any]:
    sizes = QUICK if quick else FULL
    turns = workload(rng, sizes)
    out: dict[str, Any] = {"conversations": sizes.conversations, "requests": len(turns),
                           "pool_blocks": sizes.pool_blocks, "cpu_tier_blocks": sizes.cpu_blocks}
    with tempfile.TemporaryDirectory() as tmp:
        for name, switches in VARIANTS.items():
            out[name] = replay(turns, sizes, switches, Path(tmp) / name, seed)
    off = out["off"]
    for name in VARIANTS:
        if name == "off":
            continue
        variant = out[name]
        variant["vs_off"] = {
            key: variant[key] / off[key] if off[key] else None
            for key in ("fast_tier_share_below_pool", "pool_or_cpu_block_rate", "hit_tokens",
                        "cpu_capacity_mean_bytes")
        }
    return out
