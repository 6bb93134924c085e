"""Exact eviction orders of each policy in tiny worlds."""

from __future__ import annotations

from ultra_adaptive_kv_cache_engine.policies import (
    ARCPolicy,
    FIFOPolicy,
    LFUPolicy,
    LRUPolicy,
    S3FIFOPolicy,
)
from ultra_adaptive_kv_cache_engine.policies.s3fifo_adaptive import MAX_SHARE, MIN_SHARE, AdaptiveS3FIFOPolicy
from ultra_adaptive_kv_cache_engine.policies.tick_order import TickList
from ultra_adaptive_kv_cache_engine.policies.tick_policies import TickARCPolicy, TickLRUPolicy


def fill(policy, keys, size=1):
    for k in keys:
        policy.on_insert(k, size)
    return policy


def test_lru_order_after_accesses():
    p = fill(LRUPolicy(), "abcd")
    p.on_access("a")
    p.on_access("c")
    assert p.victims(4) == ["b", "d", "a", "c"]
    p.on_insert("b", 1)  # a tracked key again counts as an access
    assert p.victims(4) == ["d", "a", "c", "b"]


def test_lfu_fewest_accesses_first_ties_by_recency():
    p = fill(LFUPolicy(), "abcd")
    for k in "bbc":
        p.on_access(k)
    assert [p.frequency(k) for k in "abcd"] == [1, 3, 2, 1]
    assert p.victims(4) == ["a", "d", "c", "b"]
    p.on_access("d")  # d reaches 2 after c: among the 2s, c is the less recent
    assert p.victims(4) == ["a", "c", "d", "b"]
    p.on_remove("c")
    p.on_insert("c", 1)  # forgotten on remove: starts again at 1
    assert p.victims(4) == ["a", "c", "d", "b"] and p.frequency("c") == 1


def test_fifo_ignores_accesses_and_reinserts():
    p = fill(FIFOPolicy(), "abc")
    p.on_access("a")
    p.on_insert("a", 1)
    assert p.victims(3) == ["a", "b", "c"]
    p.on_remove("a")
    p.on_insert("a", 1)
    assert p.victims(3) == ["b", "c", "a"]


def test_s3fifo_one_hit_wonders_leave_small_first_and_ghost_hits_go_to_main():
    p = fill(S3FIFOPolicy(capacity=10), [f"k{i}" for i in range(10)])
    p.on_access("k1")
    # S holds 10 >= 10% of 10: k0 (never accessed) leaves, k1 (accessed) moves to M, k2 leaves.
    assert p.victims(2) == ["k0", "k2"]
    assert p.queues() == ([f"k{i}" for i in range(3, 10)], ["k1"], [])
    assert p.victims(1) == ["k0"]  # pending victims come back first, nothing moves
    for k in ("k0", "k2"):
        p.on_remove(k)
    assert p.queues()[2] == ["k0", "k2"]  # evicted from S: remembered in the ghost
    p.on_insert("k0", 1)  # ghost hit: straight to M
    p.on_insert("x", 1)  # new: S
    assert p.queues() == ([*(f"k{i}" for i in range(3, 10)), "x"], ["k1", "k0"], ["k2"])
    # S's eight keys all leave before M's: the ghost-hit k0 outlives the newer one-hit wonder x.
    assert p.victims(10) == [*(f"k{i}" for i in range(3, 10)), "x", "k1", "k0"]


def test_s3fifo_main_queue_gives_accessed_keys_another_round():
    p = fill(S3FIFOPolicy(capacity=4), "ab")
    for k in "aabb":
        p.on_access(k)
    assert p.victims(0) == []
    p.on_insert("c", 1)
    p.on_insert("d", 1)
    p.on_access("a")
    got = p.victims(1)  # S = a b c d (4 >= 0.4): a and b accessed -> M (counters cleared), c leaves
    assert got == ["c"] and p.queues()[:2] == (["d"], ["a", "b"])
    p.on_remove("c")
    p.on_access("a")
    # S holds 1 >= 0.4: d leaves; then S is empty: M's a has a counter (reinserted, decremented), b leaves.
    assert p.victims(3) == ["d", "b", "a"]


def test_arc_ghost_hit_in_b1_grows_p_and_in_b2_shrinks_it():
    p = fill(ARCPolicy(capacity=2), "ab")
    assert p.p == 0.0
    assert p.victims(1) == ["a"]  # T1 (2) exceeds p (0)
    p.on_remove("a")  # a victim leaves to B1
    p.on_insert("a", 1)  # B1 hit: p += 1 * max(1, |B2| / |B1|) and a goes to T2
    assert p.p == 1.0
    assert p.victims(2) == ["a", "b"]  # T1 = [b] does not exceed p = 1: T2 first
    p.on_remove("a")  # from T2 to B2
    p.on_insert("a", 1)  # B2 hit: p -= 1 * max(1, |B1| / |B2|)
    assert p.p == 0.0
    assert p.victims(2) == ["b", "a"]


def test_arc_access_promotes_to_t2():
    p = fill(ARCPolicy(capacity=3), "abc")
    p.on_access("a")
    assert p.victims(3) == ["b", "c", "a"]


def test_arc_explicit_remove_is_not_remembered():
    p = fill(ARCPolicy(capacity=2), "ab")
    p.on_remove("a")  # not returned by victims: no ghost, so re-inserting is a plain T1 insert
    p.on_insert("a", 1)
    assert p.p == 0.0 and p.victims(2) == ["b", "a"]


def test_tick_list_leaves_older_ticks_first_and_last_touched_first_within_a_tick():
    now = [0]
    order = TickList(lambda: now[0])
    for k in ("root", "child", "leaf"):
        order.touch(k, 1)
    now[0] = 1
    order.touch("other", 2)
    assert [k for k, _ in order.items()] == ["leaf", "child", "root", "other"]
    now[0] = 2
    order.touch("root", 1)
    order.touch("child", 1)
    assert [k for k, _ in order.items()] == ["leaf", "other", "child", "root"]
    now[0] = 1  # a clock reading that goes back counts as the newest tick
    order.touch("leaf", 1)
    assert [k for k, _ in order.items()] == ["other", "leaf", "child", "root"] and order.total == 5


def test_tick_lru_evicts_children_before_their_root():
    now = [0]
    p = TickLRUPolicy(clock=lambda: now[0])
    fill(p, ["r", "c1", "c2"])
    now[0] = 1
    fill(p, ["x"])
    assert p.victims(4) == ["c2", "c1", "r", "x"]
    now[0] = 2
    p.on_access("r")
    p.on_access("c1")
    assert p.victims(4) == ["c2", "x", "c1", "r"]


def test_tick_arc_keeps_arc_lists_in_tick_order():
    now = [0]
    p = TickARCPolicy(capacity=8, clock=lambda: now[0])
    fill(p, ["r", "c"])
    now[0] = 1
    p.on_access("r")
    p.on_access("c")
    fill(p, ["d"])
    assert p.victims(3) == ["d", "c", "r"]  # T1 = [d] exceeds p = 0, then T2 leaf first


def test_s3fifo_adaptive_ghost_of_small_grows_the_share_ghost_of_main_shrinks_it():
    p = fill(AdaptiveS3FIFOPolicy(capacity=10), [f"k{i}" for i in range(10)])
    assert p.small_share == 0.1
    assert p.victims(2) == ["k0", "k1"]
    for k in ("k0", "k1"):
        p.on_remove(k)
    p.on_insert("k0", 1)  # back from S's ghost: S was short; s += 1/10 * max(1, |GM| 0 / |G| 2)
    assert p.small_share == 0.2
    assert p.queues() == ([f"k{i}" for i in range(2, 10)], ["k0"], ["k1"])
    # S leaves while it holds >= 2 (k2..k8), then M's k0 (it goes to the main ghost), then S's last key
    order = [*(f"k{i}" for i in range(2, 9)), "k0", "k9"]
    assert p.victims(9) == order
    for k in order:
        p.on_remove(k)
    assert len(p) == 0 and list(p._main_ghost) == ["k0"]
    assert p.queues()[2] == [f"k{i}" for i in range(2, 10)]  # G trimmed to (1 - 0.2) * 10 keys: k1 forgotten
    p.on_insert("k0", 1)  # back from M's ghost: M was short; s -= 1/10 * max(1, |G| 8 / |GM| 1)
    assert p.small_share == 0.05  # floored at MIN_SHARE
    assert p.queues()[1] == ["k0"]


def test_s3fifo_adaptive_share_stays_in_bounds():
    p = AdaptiveS3FIFOPolicy(capacity=4)
    for round_ in range(20):
        key = f"r{round_}"
        p.on_insert(key, 1)
        for victim in p.victims(len(p)):
            p.on_remove(victim)
        p.on_insert(key, 1)  # a ghost hit every round
        assert MIN_SHARE <= p.small_share <= MAX_SHARE
    assert p.small_share == MAX_SHARE
