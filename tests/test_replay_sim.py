"""The replay loop and Belady's bound in tiny worlds (4-token blocks), and run_replay end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ultra_adaptive_kv_cache_engine.policies import POLICIES, FIFOPolicy, LFUPolicy, LRUPolicy
from ultra_adaptive_kv_cache_engine.policies.replay import (
    BELADY,
    BeladyPolicy,
    TraceRequest,
    WorkloadSpec,
    compile_trace,
    generate_workload,
    next_uses,
    run_replay,
    simulate,
)
from ultra_adaptive_kv_cache_engine.policies.replay.simulator import RequestClock


def req(ids: tuple, tokens: int | None = None) -> TraceRequest:
    return TraceRequest(0.0, tokens if tokens is not None else 4 * len(ids), 0, ids)


def replay(reqs: list[TraceRequest], policy, capacity: int):
    trace = compile_trace(reqs, block_tokens=4)
    clock = RequestClock()
    policy.clock = clock
    future = next_uses(trace.keys) if isinstance(policy, BeladyPolicy) else None
    return simulate(trace, policy, capacity, clock, future)


def test_a_hit_counts_only_while_the_prefix_is_unbroken():
    reqs = [req((1, 2, 3), tokens=10), req((1, 2, 3), tokens=10), req((1, 9, 3), tokens=12)]
    c = replay(reqs, LRUPolicy(), capacity=40)
    # request 2: 3 hits, 10 tokens (the last block holds 2); request 3: 1 then 9 misses, so 3 is no hit.
    assert (c.hit_blocks, c.hit_tokens) == (4, 14)
    assert (c.stored_blocks, c.stored_tokens, c.evicted_blocks) == (4, 14, 0)


def test_capacity_in_tokens_counts_whole_blocks():
    reqs = [req((1,)), req((2,)), req((3,)), req((1,)), req((3,))]
    c = replay(reqs, LRUPolicy(), capacity=11)  # 2 blocks of 4 tokens
    assert (c.hit_blocks, c.stored_blocks, c.evicted_blocks) == (1, 4, 2)
    with pytest.raises(ValueError, match="capacity=3 tokens holds no block of 4 tokens"):
        replay(reqs, LRUPolicy(), capacity=3)


def test_next_uses_are_flat_positions():
    assert next_uses([(1, 2), (1, 3), (2,)]) == [[2, 4], [float("inf"), float("inf")], [float("inf")]]


def test_hits_of_the_request_in_flight_are_pinned():
    reqs = [req((1, 2)), req((1, 3)), req((1, 3))]
    c = replay(reqs, FIFOPolicy(), capacity=8)  # 2 slots
    # request 2 pins its hit 1, FIFO's first victim: 2 leaves instead; request 3 hits both blocks.
    assert (c.hit_blocks, c.stored_blocks, c.evicted_blocks) == (3, 3, 1)


def test_a_request_longer_than_the_cache_keeps_its_first_blocks():
    reqs = [req((1, 2, 3)), req((1, 2, 3))]
    c = replay(reqs, FIFOPolicy(), capacity=8)  # 2 slots: block 3 is never stored, nothing evicts 1 for it
    assert (c.hit_blocks, c.stored_blocks, c.evicted_blocks) == (2, 2, 0)


def test_every_missed_block_takes_a_slot_before_any_is_stored():
    reqs = [req((1, 2, 3))] * 3 + [req((4, 5)), req((1, 2, 3))]
    c = replay(reqs, LFUPolicy(), capacity=16)  # 4 slots
    # (4, 5) evicts 1 (frequency 3, least recent). The last request misses at 1, so 1, 2 and 3 are all
    # recomputed: 3 slots, only 1 of them free, so LFU's victims 4, 5 (frequency 1) and then 2 leave; 1 and
    # 2 are stored again, 3 was still cached (its prefix was broken) and is not.
    assert (c.hit_blocks, c.stored_blocks, c.evicted_blocks) == (6, 7, 4)


def test_belady_must_make_room_for_the_block_in_flight():
    reqs = [req((k,)) for k in "abcab"]
    assert replay(reqs, LRUPolicy(), capacity=8).hit_blocks == 0
    c = replay(reqs, BeladyPolicy(8), capacity=8)
    # c needs a slot: b leaves (next use 4, after a's 3); then c (never used again) leaves for b. Only a hits.
    assert (c.hit_blocks, c.stored_blocks, c.evicted_blocks) == (1, 4, 2)


def test_belady_evicts_the_furthest_next_use():
    reqs = [req((k,)) for k in "abcbca"]
    c = replay(reqs, BeladyPolicy(8), capacity=8)
    # c (next use 4) evicts a (5) rather than b (3); b, c hit; the last a takes the slot of b or c (never used).
    assert (c.hit_blocks, c.stored_blocks, c.evicted_blocks) == (2, 4, 2)


def test_belady_bounds_every_policy_on_a_workload():
    trace = generate_workload("mix", WorkloadSpec(requests=400, seed=5))
    results = run_replay(trace, [100_000, 400_000], show_progress=False)
    for cap in (100_000, 400_000):
        row = {r.policy: r.hit_blocks for r in results if r.capacity_tokens == cap}
        assert set(row) == {*POLICIES, BELADY}
        assert all(row[BELADY] >= hits for hits in row.values())
        assert row[BELADY] > row["lru"]


def test_run_replay_results_are_ordered_and_consistent(tmp_path: Path):
    reqs = [req((1, 2), tokens=8), req((1, 2), tokens=7), req((1, 3), tokens=6)]
    path = tmp_path / "tiny.jsonl"
    path.write_text("".join(json.dumps(r.as_dict()) + "\n" for r in reqs))
    results = run_replay(path, [8, 16], ["fifo", "belady"], block_tokens=4, bytes_per_token=10, show_progress=False)
    assert [(r.trace, r.policy, r.capacity_tokens) for r in results] == [
        ("tiny", "fifo", 8), ("tiny", "fifo", 16), ("tiny", "belady", 8), ("tiny", "belady", 16)
    ]
    big = results[1]
    assert (big.requests, big.blocks, big.tokens, big.hit_blocks, big.hit_tokens) == (3, 6, 21, 3, 11)
    assert big.block_hit_rate == 0.5 and big.token_hit_rate == 11 / 21
    assert (big.bytes_loaded, big.bytes_stored) == (110, 100)  # stored: blocks 1, 2 (8 tokens) and 3 (2)
    dicts = [r.as_dict() for r in reqs]
    again = run_replay(dicts, [8, 16], ["fifo", "belady"], block_tokens=4, bytes_per_token=10, name="tiny",
                       show_progress=False)
    assert again == results


def test_plot_writes_a_png(tmp_path: Path):
    pytest.importorskip("matplotlib")
    from ultra_adaptive_kv_cache_engine.policies.replay import plot_hit_rates

    results = run_replay([req((1, 2)), req((1, 2))], [4, 8], ["lru", "belady"], block_tokens=4, show_progress=False)
    out = plot_hit_rates(results, tmp_path / "p.png", title="tiny")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="results is empty"):
        plot_hit_rates([], tmp_path / "q.png")


def test_workers_give_the_same_results_as_one_process():
    trace = generate_workload("chat", WorkloadSpec(requests=200, seed=2))
    one = run_replay(trace, [50_000, 200_000], ["lru", "adaptive", "belady"], show_progress=False)
    two = run_replay(trace, [50_000, 200_000], ["lru", "adaptive", "belady"], workers=2, show_progress=False)
    assert one == two


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"capacities": [0]}, "capacity 0"),
        ({"capacities": []}, "need at least one"),
        ({"policies": ["lru", "mru"]}, "adaptive, adaptive_sampled, arc, belady, fifo, lfu, lru, s3fifo"),
        ({"workers": 0}, "workers=0"),
    ],
)
def test_run_replay_refuses_bad_arguments(kwargs: dict, message: str):
    args = {"capacities": [1024], "policies": ["lru"], **kwargs}
    with pytest.raises(ValueError, match=message):
        run_replay([req((1,))], args.pop("capacities"), args.pop("policies"), show_progress=False, **args)
    with pytest.raises(TypeError, match="trace must be a path or a sequence"):
        run_replay(42, [1024], ["lru"])  # type: ignore[arg-type]
