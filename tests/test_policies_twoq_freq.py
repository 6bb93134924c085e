"""twoq_freq: twoq_adaptive whose protected queue spends hit counters as second chances; exact state."""

from __future__ import annotations

from ultra_adaptive_kv_cache_engine.policies import TwoQFrequencyPolicy
from ultra_adaptive_kv_cache_engine.policies.twoq_freq import MAX_FREQ


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        return self.now


def filled(clock: Clock) -> TwoQFrequencyPolicy:
    """P = [c, d]; M = [a (hit once in M), b (just promoted)]."""
    p = TwoQFrequencyPolicy(capacity=4, clock=clock)
    for i, key in enumerate("abcd"):
        clock.now = i
        p.on_insert(key, 1)
    for clock.now, key in ((4, "a"), (5, "a"), (6, "b")):
        p.on_access(key)  # a: P -> M (counter 0), then a hit in M (counter 1); b: P -> M
    assert p.queues() == (["c", "d"], ["a", "b"]) and p._freq == {"a": 1}
    return p


def test_a_key_hit_in_main_is_spared_once_and_moves_to_the_newest_tick():
    clock = Clock()
    p = filled(clock)
    clock.now = 7
    assert p.victims(3) == ["c", "d", "b"]  # a had a counter: spared, counter spent
    assert p.queues() == (["c", "d"], ["b", "a"]) and p._freq == {"a": 0}
    assert p.victims(4) == ["c", "d", "b", "a"]  # no counter left: plain order, nothing moves
    assert p.queues() == (["c", "d"], ["b", "a"])


def test_spared_keys_are_taken_last_when_main_runs_out():
    clock = Clock()
    p = filled(clock)
    clock.now = 7
    assert p.victims(4) == ["c", "d", "b", "a"]  # the walk ran out of M: the spared a comes last
    assert p.queues() == (["c", "d"], ["b", "a"]) and p._freq == {"a": 0}
    for key in ("c", "d", "b", "a"):
        p.on_remove(key)
    assert len(p) == 0 and p._freq == {} and p.victims(1) == []


def test_counter_is_capped_and_dropped_with_the_key():
    clock = Clock()
    p = filled(clock)
    for clock.now in range(8, 14):
        p.on_access("a")
    assert p._freq == {"a": MAX_FREQ}
    clock.now = 20
    p.on_insert("a", 1)  # an insert of a tracked key counts as a hit (still capped)
    assert p._freq == {"a": MAX_FREQ}
    p.on_remove("a")
    assert "a" not in p and p._freq == {}
