"""One conformance suite for every registered eviction policy (and the adaptive policy's experts)."""

from __future__ import annotations

import random
from collections.abc import Hashable

import pytest

from ultra_adaptive_kv_cache_engine.policies import POLICIES, EvictionPolicy, make_policy
from ultra_adaptive_kv_cache_engine.policies.tick_policies import TickARCPolicy, TickLRUPolicy

CLASSES: dict[str, type[EvictionPolicy]] = {**POLICIES, "tick-lru": TickLRUPolicy, "tick-arc": TickARCPolicy}


class Counter:
    """A clock that reads what the test sets."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        return self.now


def new(name: str, capacity: int | None = 8) -> EvictionPolicy:
    return CLASSES[name](capacity, Counter())


@pytest.fixture(params=sorted(CLASSES))
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def test_registry_has_the_ten_strategies():
    assert sorted(POLICIES) == [
        "adaptive", "adaptive_sampled", "arc", "fifo", "lfu", "lru", "s3fifo", "s3fifo_adaptive", "twoq_adaptive", "twoq_freq",
    ]
    for key, cls in POLICIES.items():
        assert cls.name == key
        assert type(make_policy(key.upper(), 4)) is cls


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'nope'.*adaptive, adaptive_sampled, arc, fifo, lfu, lru, s3fifo"):
        make_policy("nope")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_capacity_is_refused(name: str, bad: object):
    with pytest.raises(ValueError, match="capacity"):
        CLASSES[name](bad)  # type: ignore[arg-type]


def test_len_and_contains_follow_inserts_and_removes(name: str):
    p = new(name)
    for k in range(6):
        p.on_insert(k, 1)
    assert len(p) == 6 and all(k in p for k in range(6)) and 99 not in p
    p.on_insert(3, 1)  # a tracked key again: still one key
    p.on_remove(2)
    p.on_remove(42)  # unknown: no-op
    p.on_access(42)  # unknown: no-op
    assert len(p) == 5 and 2 not in p and 3 in p


def test_victims_are_tracked_distinct_and_min_n_len(name: str):
    p = new(name)
    for k in range(7):
        p.on_insert(k, 1)
    for k in (1, 4, 1, 6):
        p.on_access(k)
    for n in range(10):
        got = p.victims(n)
        assert len(got) == min(n, 7)
        assert len(set(got)) == len(got)
        assert all(k in p for k in got)
    assert len(p) == 7


def test_removing_all_victims_empties_the_policy(name: str):
    p = new(name)
    for k in range(5):
        p.on_insert(k, 2)
    p.on_access(0)
    got = p.victims(len(p))
    assert sorted(got) == [0, 1, 2, 3, 4]
    for k in got:
        p.on_remove(k)
    assert len(p) == 0 and p.victims(3) == []


def test_admit_defaults_to_true(name: str):
    assert new(name).admit("k", 1) is True


def test_reinsert_after_remove(name: str):
    p = new(name)
    p.on_insert("a", 1)
    p.on_insert("b", 1)
    (victim,) = p.victims(1)
    p.on_remove(victim)
    p.on_insert(victim, 1)
    assert len(p) == 2 and victim in p
    assert sorted(p.victims(2)) == ["a", "b"]


@pytest.mark.parametrize("capacity", [None, 5])
def test_driven_by_a_store_invariants_hold(name: str, capacity: int | None):
    """A tiny store of 5 slots over 400 seeded references: the policy tracks exactly the stored keys."""
    clock = Counter()
    p = CLASSES[name](capacity, clock)
    stored: set[Hashable] = set()
    rng = random.Random(7)
    for step in range(400):
        clock.now = step // 3
        key = rng.choice(range(12))
        if key in stored:
            p.on_access(key)
        elif p.admit(key, 1):
            while len(stored) >= 5:
                (victim,) = p.victims(1)
                assert victim in stored
                p.on_remove(victim)
                stored.remove(victim)
            p.on_insert(key, 1)
            stored.add(key)
        if step % 50 == 49 and stored:
            gone = rng.choice(sorted(stored))
            p.on_remove(gone)
            stored.remove(gone)
        assert len(p) == len(stored)
        assert all(k in p for k in stored)
        assert set(p.victims(len(stored))) == stored
