"""twoq_adaptive: exact queues, ghosts and share in tiny worlds; its doorkeeper against S3-FIFO's short ghost."""

from __future__ import annotations

from ultra_adaptive_kv_cache_engine.policies import S3FIFOPolicy, TwoQAdaptivePolicy
from ultra_adaptive_kv_cache_engine.policies.base import EvictionPolicy
from ultra_adaptive_kv_cache_engine.policies.replay import compile_trace, simulate
from ultra_adaptive_kv_cache_engine.policies.replay.simulator import RequestClock
from ultra_adaptive_kv_cache_engine.policies.replay.trace import TraceRequest
from ultra_adaptive_kv_cache_engine.policies.twoq_adaptive import MAX_SHARE, MIN_SHARE, StampedGhost


class Clock:
    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        return self.now


def evict(policy: EvictionPolicy, keys: list[str]) -> None:
    for key in keys:
        policy.on_remove(key)


def test_second_sighting_goes_to_main_and_ghost_hits_near_the_edge_move_the_share():
    clock = Clock()
    p = TwoQAdaptivePolicy(capacity=10, clock=clock)
    for i in range(10):
        clock.now = i
        p.on_insert(f"k{i}", 1)
    assert p.share == 0.1 and p.queues() == ([f"k{i}" for i in range(10)], [])
    assert p.victims(2) == ["k0", "k1"]
    evict(p, ["k0", "k1"])
    clock.now = 10
    p.on_insert("k0", 1)  # back from P's ghost, 1 unit after it left (<= 0.25 * 10): P was short
    assert p.share == 0.2 and p.queues() == ([f"k{i}" for i in range(2, 10)], ["k0"])
    clock.now = 11
    p.on_access("k2")  # a hit in P promotes to M
    assert p.queues() == ([f"k{i}" for i in range(3, 10)], ["k0", "k2"])
    # P leaves while it holds >= 0.2 * 10 (k3..k8), then M (k0, k2), then P's last key
    order = ["k3", "k4", "k5", "k6", "k7", "k8", "k0", "k2", "k9"]
    assert p.victims(10) == order
    evict(p, order)
    assert len(p) == 0
    clock.now = 12
    p.on_insert("k2", 1)  # back from M's ghost, the last to leave M: M was short
    assert p.share == 0.1 and p.queues() == ([], ["k2"])


def test_a_far_ghost_hit_is_admitted_to_main_without_moving_the_share():
    clock = Clock()
    p = TwoQAdaptivePolicy(capacity=4, clock=clock)
    for i in range(7):
        clock.now = i
        p.on_insert(f"k{i}", 1)
        if len(p) > 4:
            victim = p.victims(1)
            assert victim == [f"k{i - 4}"]
            evict(p, victim)
    p.on_insert("k0", 1)  # 2 units left P after it: more than 0.25 * 4 = 1
    assert p.share == 0.1 and "k0" in p.queues()[1]
    p.on_insert("k2", 1)  # the last to leave P
    assert p.share == 0.35


def test_a_request_leaves_deepest_block_first():
    clock = Clock()
    p = TwoQAdaptivePolicy(capacity=8, clock=clock)
    for key in ("root", "a", "b"):
        p.on_insert(key, 1)
    clock.now = 1
    p.on_insert("x", 1)
    assert p.victims(4) == ["b", "a", "root", "x"]


def test_ghosts_are_bounded_and_share_stays_in_bounds():
    ghost = StampedGhost()
    for i in range(10):
        ghost.add(i, 2, limit=8)
    assert ghost.total == 8 and 5 not in ghost and 6 in ghost and ghost.evicted == 20
    assert ghost.pop(9) == 0 and ghost.pop(6) == 6 and ghost.pop(6) is None and ghost.total == 4
    clock = Clock()
    p = TwoQAdaptivePolicy(capacity=2, clock=clock)
    for round_ in range(40):
        clock.now = round_
        key = f"r{round_}"
        p.on_insert(key, 1)
        evict(p, p.victims(len(p)))
        p.on_insert(key, 1)  # back from P's ghost at once, every round
        assert MIN_SHARE <= p.share <= MAX_SHARE
    assert p.share == MAX_SHARE


def test_capacity_none_uses_the_largest_total_tracked():
    p = TwoQAdaptivePolicy(clock=Clock())
    for i in range(5):
        p.on_insert(i, 3)
    assert p.target_capacity == 15
    evict(p, [0, 1])
    assert p.target_capacity == 15


def conversations(pairs: int, filler: int) -> list[TraceRequest]:
    """Each conversation's first turn, then `filler` one-off prompts, then its second turn (3 blocks more)."""
    out: list[TraceRequest] = []
    for c in range(pairs):
        first = (f"c{c}a", f"c{c}b")
        out.append(TraceRequest(0.0, 1024, 1, first))
        out.extend(TraceRequest(0.0, 1024, 1, (f"f{c}_{i}a", f"f{c}_{i}b")) for i in range(filler))
        out.append(TraceRequest(0.0, 2560, 1, (*first, f"c{c}c", f"c{c}d", f"c{c}e")))
    third = [TraceRequest(0.0, 3072, 1, (f"c{c}a", f"c{c}b", f"c{c}c", f"c{c}d", f"c{c}e", f"c{c}f"))
             for c in range(pairs)]
    return out + third


def test_second_turns_after_long_gaps_are_kept_where_s3fifo_forgets_them():
    """Second turns come after 3 capacities of one-off prompts: S3-FIFO's ghost (0.9 c) has forgotten the
    first turns, the 4 c doorkeeper has not: the first turns' blocks come back into M and every third turn
    hits them (2 blocks each; the second turns' own blocks were first sightings, left in P)."""
    trace = compile_trace(conversations(pairs=6, filler=30), 512, "turns")
    capacity = 20 * 512
    counts = {}
    for cls in (S3FIFOPolicy, TwoQAdaptivePolicy):
        clock = RequestClock()
        counts[cls.name] = simulate(trace, cls(capacity, clock), capacity, clock).hit_blocks
    assert counts == {"s3fifo": 0, "twoq_adaptive": 12}
