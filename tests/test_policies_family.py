"""The fused default experts (`TwoQFamily`) answer exactly as separate instances; sampled shadows are stable."""

from __future__ import annotations

import random

import pytest

from ultra_adaptive_kv_cache_engine.policies import AdaptivePolicy, SampledAdaptivePolicy
from ultra_adaptive_kv_cache_engine.policies.adaptive import EXPERTS
from ultra_adaptive_kv_cache_engine.policies.expert_group import ExpertGroup
from ultra_adaptive_kv_cache_engine.policies.expert_shadows import EXPERT_SHADOWS
from ultra_adaptive_kv_cache_engine.policies.key_sample import (
    GOLDEN,
    is_sampled,
    sampling_rate,
    stable_key_hash,
)
from ultra_adaptive_kv_cache_engine.policies.shadow import ShadowCache
from ultra_adaptive_kv_cache_engine.policies.twoq_family import TwoQFamily


class Tick:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("capacity", [6, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_family_equals_separate_experts_on_random_streams(seed: int, capacity: int | None):
    rng = random.Random(seed)
    tick = Tick()
    fused, group = TwoQFamily(capacity, tick), ExpertGroup(EXPERTS, capacity, tick)
    assert fused.names == group.names
    held: list[int] = []
    for step in range(3000):
        tick.now = step // 3  # three events per tick, as a request's blocks share one
        key = rng.randrange(40)
        if key in held:
            fused.on_access(key)
            group.on_access(key)
            continue
        while len(held) >= 6:
            expert = rng.randrange(3)
            victim = fused.victims(expert, 2)
            assert victim == group.victims(expert, 2)  # twoq_freq's ask moves its queue: both asked alike
            fused.on_remove(victim[0])
            group.on_remove(victim[0])
            held.remove(victim[0])
        size = rng.choice((1, 1, 2))
        fused.on_insert(key, size)
        group.on_insert(key, size)
        held.append(key)
    for expert in range(3):
        assert fused.victims(expert, 6) == group.victims(expert, 6)
    assert fused.share == group.experts[0].share == group.experts[1].share and len(fused) == len(group) == 6
    with pytest.raises(ValueError, match="expert=3 must be 0, 1 or 2"):
        fused.victims(3, 1)


def test_stable_key_hash_is_fixed_across_processes():
    # values pinned: Python's salted hash() would change them from run to run
    assert stable_key_hash(0) == 0 and stable_key_hash(1) == 0x9E3779B97F4A7C15 == GOLDEN
    assert stable_key_hash(3) == (3 * GOLDEN) % 2**64
    assert stable_key_hash(b"abc") == 0x352441C2 << 32 == stable_key_hash("abc")
    assert stable_key_hash(("a", 1)) == stable_key_hash(repr(("a", 1)))
    assert sum(is_sampled(k, 8) for k in range(80_000)) == pytest.approx(10_000, rel=0.03)
    assert all(is_sampled(k, 1) for k in range(10))


def test_sampling_rate_keeps_the_shadow_slots():
    assert sampling_rate(2048, 8, 256) == 8 and sampling_rate(2047, 8, 256) == 4
    assert sampling_rate(100_000, 8, 256) == 8 and sampling_rate(300, 8, 256) == 1
    with pytest.raises(ValueError, match="max_rate=0"):
        sampling_rate(10, 0, 1)


def test_adaptive_shadows_see_one_key_in_r_at_one_capacity_in_r():
    full = AdaptivePolicy(capacity=2047)
    full.on_insert(7, 1)
    assert full.rate == 1 and full._shadows[0].capacity == 2047  # below 2 x 1,024 slots: every key
    default = AdaptivePolicy(capacity=4096 * 512)
    default.on_insert(7, 512)
    assert default.rate == 4 and default._shadows[0].capacity == 1024 * 512
    p = SampledAdaptivePolicy(capacity=4096, clock=lambda: 0.0)
    p.on_insert(7, 1)
    assert p.rate == 8 and [s.capacity for s in p._shadows] == [512] * 3
    for key in range(8, 2000):
        p.on_insert(key, 1)
    sampled = {k for k in range(7, 2000) if is_sampled(k, 8)}
    assert p._sampled == sampled and all(set(s._size) == sampled for s in p._shadows)
    small = SampledAdaptivePolicy(capacity=300)
    small.on_insert("a", 1)
    assert small.rate == 1 and small._shadows[0].capacity == 300


@pytest.mark.parametrize("cls", EXPERTS)
@pytest.mark.parametrize("seed", [0, 1])
def test_inlined_shadows_equal_shadow_caches_of_the_experts(cls: type, seed: int):
    rng = random.Random(seed)
    tick = Tick()
    reference, inlined = ShadowCache(cls(12, tick), 12), EXPERT_SHADOWS[cls](12)
    hot = list(range(8))
    for step in range(4000):
        tick.now = step // 4
        key = rng.choice(hot) if rng.random() < 0.5 else rng.randrange(8, 60)
        size, weight = rng.choice((1, 1, 2)), 1.0 + step / 100
        reference.touch(key, size, tick.now, weight)
        inlined.touch(key, size, tick.now, weight)
        assert set(reference._size) == set(inlined._size) and reference.used == inlined.used
    assert reference.score == inlined.score > 0
