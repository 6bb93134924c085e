"""A live replay equals the simulator: every registered policy, through the cache manager and its block pool.

Each trace request goes through the live API as an engine would run it: `new_sequence` with the request's
tokens, `append` of the KV of the tokens not cached, `commit`, `free`; the pool's policy is the configured
strategy's, on a per-request tick. The block hits, the stored blocks and the evictions must equal
`simulate(...)` exactly (the simulator's rules are the live ones: see `policies/replay/simulator.py`).
Each trace block id becomes `BLOCK` token ids of its own, so equal prefixes have equal chained hashes; the
synthetic traces' blocks of 512 tokens become pool blocks of 4 (capacities scale by a power of two, so the
size-weighted policies compute the same numbers). Tiny world: 1 layer, 1 KV head, head_dim 4, CPU, float32.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.policies import POLICIES, AdaptivePolicy, EvictionPolicy, make_policy
from ultra_adaptive_kv_cache_engine.policies.replay import (
    CompiledTrace,
    ReplayCounts,
    WorkloadSpec,
    compile_trace,
    generate_workload,
    simulate,
)
from ultra_adaptive_kv_cache_engine.policies.replay.simulator import RequestClock

BLOCK = 4
TRACE_BLOCK = 512
SPEC = KVSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=BLOCK, dtype=torch.float32)
WORLDS = {"chat": 32, "mix": 48}  # workload -> pool blocks (mix has requests longer than its pool)
SAMPLED_REQUESTS = 1500


def live_cache(strategy: str, num_blocks: int) -> KVCacheManager:
    """The manager of `strategy` over `num_blocks` blocks, its pool driven by its policy."""
    cache = KVCacheManager(KVCacheConfig(block_size=BLOCK, cache_strategy=strategy, device="cpu"), SPEC,
                           num_blocks=num_blocks)
    assert cache.pool.policy is not None and cache.pool.policy.name == strategy
    return cache


def token_ids(keys: tuple[Hashable, ...], names: dict[Hashable, int]) -> list[int]:
    """`BLOCK` token ids per trace block, the same for the same block id in every request."""
    out: list[int] = []
    for key in keys:
        first = BLOCK * names.setdefault(key, len(names))
        out.extend(range(first, first + BLOCK))
    return out


def live_names(trace: CompiledTrace, num_blocks: int) -> CompiledTrace:
    """`trace` with every block id replaced by the chained hash the live cache names it by: policies that
    sample keys by a stable hash of their name (the adaptive policy's shadows) then see the same keys."""
    cache = live_cache("lru", num_blocks)
    names: dict[Hashable, int] = {}
    keys = tuple(tuple(cache.hash_prompt(token_ids(k[:num_blocks], names))) for k in trace.keys)
    assert all(len(k) == min(len(t), num_blocks) for k, t in zip(keys, trace.keys, strict=True))
    return CompiledTrace(trace.name, keys, trace.tokens, trace.block_tokens)


def live_replay(trace: CompiledTrace, strategy: str, num_blocks: int) -> ReplayCounts:
    cache = live_cache(strategy, num_blocks)
    names: dict[Hashable, int] = {}
    hit_blocks = 0
    for keys in trace.keys:
        tokens = token_ids(keys[:num_blocks], names)  # a request holds all its blocks at once (simulator rule)
        seq = cache.new_sequence(tokens)
        cached = cache.num_cached_tokens(seq)
        hit_blocks += cached // BLOCK
        zeros = [torch.zeros(1, len(tokens) - cached, 4)]
        cache.append(seq, tokens[cached:], zeros, zeros)
        cache.commit(seq)
        cache.free(seq)
    stats = cache.stats()
    assert stats["free_blocks"] == num_blocks and stats["indexed_blocks"] == len(cache.pool.policy)  # type: ignore[arg-type]
    return ReplayCounts(hit_blocks, 0, stats["committed_blocks"], 0, stats["block_evictions"])


@pytest.fixture(scope="module", params=sorted(WORLDS))
def world(request: pytest.FixtureRequest) -> tuple[CompiledTrace, int]:
    trace = generate_workload(request.param, WorkloadSpec(requests=300, seed=3, block_tokens=TRACE_BLOCK))
    return compile_trace(trace, TRACE_BLOCK, request.param), WORLDS[request.param]


def assert_live_equals_simulated(trace: CompiledTrace, strategy: str, num_blocks: int) -> EvictionPolicy:
    """Replays `trace` both ways (the simulator on the live names); returns the simulated policy."""
    clock = RequestClock()
    capacity = num_blocks * TRACE_BLOCK
    policy = make_policy(strategy, capacity, clock)
    sim = simulate(live_names(trace, num_blocks), policy, capacity, clock)
    live = live_replay(trace, strategy, num_blocks)
    assert (live.hit_blocks, live.stored_blocks, live.evicted_blocks) == (
        sim.hit_blocks, sim.stored_blocks, sim.evicted_blocks
    )
    assert sim.hit_blocks > 0 and sim.evicted_blocks > 0
    return policy


@pytest.mark.parametrize("strategy", sorted(POLICIES))
def test_live_replay_equals_the_simulator(world: tuple[CompiledTrace, int], strategy: str):
    trace, num_blocks = world
    assert_live_equals_simulated(trace, strategy, num_blocks)


@pytest.mark.parametrize(("strategy", "num_blocks", "rate"), [("adaptive", 2048, 2), ("adaptive_sampled", 1024, 4)])
def test_live_replay_equals_the_simulator_with_sampled_shadows(strategy: str, num_blocks: int, rate: int):
    """Pools large enough for sampled shadows: 1 key in `rate` (those whose stable hash falls there), the
    same keys live and simulated."""
    trace = compile_trace(generate_workload("mix", WorkloadSpec(requests=SAMPLED_REQUESTS, seed=3,
                                                                block_tokens=TRACE_BLOCK)), TRACE_BLOCK, "mix")
    policy = assert_live_equals_simulated(trace, strategy, num_blocks)
    assert isinstance(policy, AdaptivePolicy) and policy.rate == rate
