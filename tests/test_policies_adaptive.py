"""The adaptive policy: shadow caches score each expert, the store follows the best one."""

from __future__ import annotations

import pytest
from test_policies_twoq import conversations

from ultra_adaptive_kv_cache_engine.policies import AdaptivePolicy, FIFOPolicy, LRUPolicy, TwoQAdaptivePolicy
from ultra_adaptive_kv_cache_engine.policies.adaptive import EXPERTS
from ultra_adaptive_kv_cache_engine.policies.base import EvictionPolicy
from ultra_adaptive_kv_cache_engine.policies.replay import CompiledTrace, compile_trace, simulate
from ultra_adaptive_kv_cache_engine.policies.replay.simulator import RequestClock
from ultra_adaptive_kv_cache_engine.policies.replay.trace import TraceRequest
from ultra_adaptive_kv_cache_engine.policies.shadow import ShadowCache
from ultra_adaptive_kv_cache_engine.policies.tick_policies import TickLRUPolicy


def test_shadow_scores_hits_under_the_prefix_rule():
    s = ShadowCache(LRUPolicy(), capacity=3)
    s.touch("a", 1, tick=0, weight=1.0)
    s.touch("b", 1, tick=0, weight=1.0)
    assert s.score == 0.0 and s.used == 2
    s.touch("a", 1, tick=1, weight=2.0)
    s.touch("b", 1, tick=1, weight=2.0)
    assert s.score == 4.0
    s.touch("x", 1, tick=2, weight=1.0)  # a miss in tick 2 ...
    s.touch("a", 1, tick=2, weight=1.0)  # ... so this hit does not count (its prefix was broken)
    assert s.score == 4.0 and s.used == 3
    s.touch("y", 1, tick=3, weight=1.0)  # full: LRU's victim (b) leaves the shadow
    assert "b" not in s and all(k in s for k in "xay")
    s.touch("huge", 9, tick=4, weight=1.0)  # larger than the capacity: a miss, not held
    assert "huge" not in s and s.used == 3


class Store:
    """A store of `slots` unit blocks driving `policy`; one tick per reference (the clock is the step)."""

    def __init__(self, policy: AdaptivePolicy, slots: int) -> None:
        self.policy, self.slots, self.step = policy, slots, 0
        self.stored: list[str] = []
        policy.clock = lambda: self.step  # type: ignore[method-assign]

    def refs(self, keys: str) -> None:
        for key in keys:
            self.step += 1
            if key in self.stored:
                self.policy.on_access(key)
                continue
            if len(self.stored) >= self.slots:
                (victim,) = self.policy.victims(1)
                self.policy.on_remove(victim)
                self.stored.remove(victim)
            self.policy.on_insert(key, 1)
            self.stored.append(key)


def test_follows_the_expert_whose_shadow_hits_more():
    # a b a c a: LRU keeps the re-used a (2 shadow hits), FIFO drops it at c (1 hit).
    p = AdaptivePolicy(capacity=2, experts=(FIFOPolicy, LRUPolicy))
    store = Store(p, slots=2)
    store.refs("aba")
    assert p.experts == ["fifo", "lru"]
    s_fifo, s_lru = p.scores
    assert s_fifo == s_lru > 0 and p.leader == 0  # tie: the current leader stays
    store.refs("c")  # victims chosen by FIFO (the leader): a leaves the real cache
    assert store.stored == ["b", "c"]
    store.refs("a")
    s_fifo, s_lru = p.scores
    assert s_lru > s_fifo
    p.victims(1)
    assert p.leader == 1 and p.victims(2) == p.expert_victims(1, 2) == ["c", "a"]


def test_every_expert_tracks_exactly_the_stored_keys():
    p = AdaptivePolicy(capacity=3)
    Store(p, slots=3).refs("abcabdeafgab")
    keys = set(p.victims(len(p)))
    assert len(p) == 3
    for expert in range(len(p.experts)):
        assert set(p.expert_victims(expert, 3)) == keys


def test_capacity_none_sizes_shadows_from_what_is_tracked():
    p = AdaptivePolicy(capacity=None)
    Store(p, slots=3).refs("abcab")
    assert [s.capacity for s in p._shadows] == [3] * len(EXPERTS)


def test_needs_an_expert():
    with pytest.raises(ValueError, match="experts"):
        AdaptivePolicy(4, experts=())


def test_default_experts_are_the_two_2q_policies_and_lru():
    assert AdaptivePolicy(8).experts == ["twoq_adaptive", "twoq_freq", "tick-lru"]


def replay(cls: type[EvictionPolicy], trace: CompiledTrace, blocks: int) -> tuple[int, EvictionPolicy]:
    clock = RequestClock()
    policy = cls(blocks * 512, clock)
    return simulate(trace, policy, blocks * 512, clock).hit_blocks, policy


def test_follows_the_doorkeeper_when_second_turns_come_late():
    """Second turns after 3 capacities of one-off prompts (see test_policies_twoq): LRU keeps nothing of the
    first turns, twoq_adaptive's 4c ghost readmits them; the adaptive policy stays with twoq_adaptive."""
    trace = compile_trace(conversations(pairs=6, filler=30), 512, "turns")
    hits = {cls.name: replay(cls, trace, 20)[0] for cls in (TwoQAdaptivePolicy, TickLRUPolicy)}
    got, policy = replay(AdaptivePolicy, trace, 20)
    assert hits == {"twoq_adaptive": 12, "tick-lru": 0} and got == 12 and policy.leader == 0


def test_follows_lru_when_first_sightings_come_back_within_the_capacity():
    """Every prompt comes back once, 12 prompts later, never again: LRU of 30 blocks hits every return; twoq's
    protected queue fills with keys that will not come back and squeezes probation. The adaptive policy
    switches to LRU and loses only the returns before its shadows tell them apart."""
    requests = []
    for i in range(300):
        requests.append(TraceRequest(0.0, 512, 1, (f"x{i}",)))
        if i >= 12:
            requests.append(TraceRequest(0.0, 512, 1, (f"x{i - 12}",)))
    trace = compile_trace(requests, 512, "once")
    hits = {cls.name: replay(cls, trace, 30)[0] for cls in (TwoQAdaptivePolicy, TickLRUPolicy)}
    got, policy = replay(AdaptivePolicy, trace, 30)
    assert hits == {"twoq_adaptive": 277, "tick-lru": 288} and got == 286 and policy.leader == 2
