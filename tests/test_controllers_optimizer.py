"""PerformanceOptimizer: exact compute-or-load splits in tiny worlds, the measured cost models, and the
seed's advanced_optimization for its three goals."""

from __future__ import annotations

import json
import random

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.engine.cost_model import BandwidthModel, PrefillCostModel, PrefillFit
from ultra_adaptive_kv_cache_engine.engine.entry_optimization import OptimizationOptions
from ultra_adaptive_kv_cache_engine.engine.optimizer import CachedBlock, PerformanceOptimizer
from ultra_adaptive_kv_cache_engine.types import OptimizationGoal


class StepClock:
    """A clock that moves `step` seconds each time it is read."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def world(truth: PrefillFit, bandwidths: dict[str, float]) -> PerformanceOptimizer:
    """An optimizer whose models were fed exact observations of `truth` and the given bandwidths."""
    optimizer = PerformanceOptimizer()
    for start, end in ((0, 16), (0, 64), (32, 64), (8, 40), (0, 128)):
        optimizer.observe_prefill(start, end, truth.time(start, end))
    for tier, bw in bandwidths.items():
        optimizer.bandwidth.set_prior(tier, bw)
    return optimizer


TRUTH = PrefillFit(fixed_s=0.01, per_token_s=0.001, per_token_pos_s=0.0001, per_cached_token_s=0.00002)


def test_prefill_fit_recovers_the_generating_costs():
    fit = world(TRUTH, {}).prefill.fit()
    assert fit.coefficients == pytest.approx(TRUTH.coefficients)
    assert fit.time(10, 10) == 0.0
    assert TRUTH.time(8, 40) == pytest.approx(0.01 + 0.032 + 0.0001 * (1600 - 64) / 2 + 0.00002 * 8)


def test_prefill_fit_uses_no_more_unknowns_than_points_and_stays_non_negative():
    model = PrefillCostModel()
    model.observe(0, 100, 1.0)
    assert model.fit() == PrefillFit(0.0, 0.01, 0.0, 0.0)
    model.observe(0, 100, 3.0)  # the same point again: still one unknown, the mean
    assert model.fit().per_token_s == pytest.approx(0.02)
    model = PrefillCostModel()
    model.observe(0, 10, 1.0)  # costs that fall with length would need a negative term: it is dropped
    model.observe(0, 20, 1.0)
    assert min(model.fit().coefficients) >= 0.0
    for end in (30, 40, 50):  # four points, none with a cached prefix: the cached-token cost stays unfitted
        model.observe(0, end, end / 10)
    assert model.fit().per_cached_token_s == 0.0
    with pytest.raises(ValueError, match="no observation"):
        PrefillCostModel().fit()
    with pytest.raises(ValueError, match="0 <= start < end"):
        model.observe(5, 5, 1.0)


def test_bandwidth_is_an_ewma_of_time_per_byte():
    model = BandwidthModel(alpha=0.5)
    model.observe("disk", 1000, 1.0)
    model.observe("disk", 1000, 3.0)
    assert model.bandwidth("disk") == pytest.approx(500.0)  # 0.5 * 3 ms + 0.5 * 1 ms per byte
    model.set_prior("cpu", 1e6)
    assert model.transfer_time("cpu", 2000) == pytest.approx(0.002)
    with pytest.raises(ValueError, match=r"tier 'redis' has no measured bandwidth; measured: \['cpu', 'disk'\]"):
        model.bandwidth("redis")


def test_probe_sets_the_prior_from_a_timed_read():
    optimizer = PerformanceOptimizer(clock=StepClock(0.5))
    assert optimizer.probe_tier("disk", lambda: 1000) == pytest.approx(2000.0)
    assert optimizer.bandwidth.bandwidth("disk") == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="moved 0 bytes"):
        optimizer.probe_tier("disk", lambda: 0)


def test_fast_tier_prefix_is_loaded_and_slow_tail_recomputed():
    # blocks of 4 tokens, 100 bytes: from "cpu" 0.0001 s each, from "disk" 1 s each (recompute is ~0.01 s)
    optimizer = world(TRUTH, {"cpu": 1e6, "disk": 100.0})
    blocks = [CachedBlock("cpu", 100)] * 3 + [CachedBlock("disk", 100)] * 2
    plan = optimizer.plan(prompt_tokens=30, block_size=4, blocks=blocks)
    assert (plan.load_blocks, plan.load_tokens, plan.compute_tokens) == (3, 12, 18)
    assert plan.load_s == pytest.approx(3e-4)
    assert plan.compute_s == pytest.approx(TRUTH.time(12, 30))
    assert plan.recompute_s == pytest.approx(TRUTH.time(0, 30))
    assert plan.all_load_s == pytest.approx(3e-4 + 2.0 + TRUTH.time(20, 30))
    assert plan.total_s < min(plan.recompute_s, plan.all_load_s)  # acting beats both fixed choices


def test_everything_slow_means_recompute_and_everything_fast_means_load_all_usable():
    optimizer = world(TRUTH, {"cpu": 1e9, "disk": 10.0})
    assert optimizer.plan(30, 4, [CachedBlock("disk", 100)] * 7).load_blocks == 0
    # 7 blocks cached but the last token must be computed: at most (16 - 1) // 4 = 3 blocks are usable
    plan = optimizer.plan(16, 4, [CachedBlock("cpu", 100)] * 7)
    assert (plan.load_blocks, plan.compute_tokens) == (3, 4)


def test_ties_go_to_less_io():
    optimizer = PerformanceOptimizer()
    optimizer.observe_prefill(0, 8, 8.0)  # 1 s per token, no fixed cost, nothing quadratic
    optimizer.bandwidth.set_prior("disk", 1.0)  # 4 bytes per block of 4 tokens: 4 s, the same as recompute
    assert optimizer.plan(9, 4, [CachedBlock("disk", 4)] * 2).load_blocks == 0


def test_the_plan_is_never_worse_than_the_cheaper_extreme():
    rng = random.Random(11)
    for _ in range(200):
        truth = PrefillFit(rng.uniform(0, 0.05), rng.uniform(1e-4, 1e-2), rng.uniform(0, 1e-4))
        optimizer = world(truth, {"cpu": 10 ** rng.uniform(3, 8), "disk": 10 ** rng.uniform(2, 6)})
        blocks = [CachedBlock(rng.choice(["cpu", "disk"]), 4096) for _ in range(rng.randint(0, 40))]
        plan = optimizer.plan(rng.randint(1, 200), 16, blocks)
        assert plan.total_s <= min(plan.recompute_s, plan.all_load_s) + 1e-12


def test_plan_rejects_bad_input():
    optimizer = world(TRUTH, {"cpu": 1e6})
    with pytest.raises(ValueError, match="prompt_tokens=0"):
        optimizer.plan(0, 4, [])
    with pytest.raises(TypeError, match="CachedBlock"):
        optimizer.plan(30, 4, [("cpu", 100)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="'gpu' has no measured bandwidth"):
        optimizer.plan(30, 4, [CachedBlock("gpu", 100)])


# -- advanced_optimization ------------------------------------------------------------------------------------
def test_unknown_goal_names_the_valid_ones():
    with pytest.raises(ValueError, match="'speed' is not valid; expected one of: latency, memory, throughput"):
        PerformanceOptimizer().advanced_optimization([torch.zeros(2)], "speed")
    with pytest.raises(TypeError, match=r"cache_entries\[1\] is a str"):
        PerformanceOptimizer().advanced_optimization([torch.zeros(2), "x"], "memory")  # type: ignore[list-item]


def test_memory_goal_picks_the_smallest_encoding_within_the_error_bound():
    torch.manual_seed(0)
    entries = [torch.randn(1, 8, 64) for _ in range(10)]
    result = PerformanceOptimizer().advanced_optimization(entries, "memory")
    metrics = result["metrics"]
    assert metrics["codecs"] == ["int8"] * 10  # int4 and fp8 exceed 1% of absmax; int8 is within 1/254
    assert metrics["bytes_before"] == 10 * 512 * 4
    assert metrics["bytes_after"] == sum(
        e.nbytes + len(json.dumps(e.meta.as_json(), separators=(",", ":"))) for e in result["entries"]
    )
    assert metrics["max_relative_error"] <= 1 / 254 + 1e-6
    assert result["optimized_count"] == 10
    saved = metrics["bytes_before"] - metrics["bytes_after"]
    assert result["improvement_percentage"] == pytest.approx(100 * saved / metrics["bytes_before"])
    decoded = make_codec("int8").decode(result["entries"][0].payload, result["entries"][0].meta)
    assert torch.allclose(decoded, entries[0], atol=float(entries[0].abs().max()) / 254 + 1e-6)


def test_memory_goal_with_a_zero_bound_stays_lossless():
    optimizer = PerformanceOptimizer(options=OptimizationOptions(max_relative_error=0.0))
    result = optimizer.advanced_optimization([torch.randn(4, 64)], OptimizationGoal.MEMORY)
    assert result["metrics"]["max_relative_error"] == 0.0
    assert result["metrics"]["codecs"][0] in ("identity", "zstd")


def test_latency_goal_makes_entries_contiguous_and_measures_retrieval():
    base = [torch.randn(64, 8) for _ in range(6)]
    entries = [b.t() for b in base[:4]] + base[4:]  # four non-contiguous views, two contiguous tensors
    result = PerformanceOptimizer().advanced_optimization(entries, "latency")
    assert result["optimized_count"] == 4
    assert all(e.is_contiguous() for e in result["entries"])
    assert all(torch.equal(a, b) for a, b in zip(result["entries"], entries, strict=True))
    assert result["entries"][4] is entries[4]
    assert result["metrics"]["retrieve_before_s"] > 0 and result["metrics"]["retrieve_after_s"] > 0
    assert not entries[0].is_contiguous()  # inputs untouched


def test_latency_goal_on_contiguous_entries_changes_nothing():
    entries = [torch.randn(1, 8, 64) for _ in range(10)]
    result = PerformanceOptimizer().advanced_optimization(entries, "latency")
    assert (result["optimized_count"], result["improvement_percentage"]) == (0, 0.0)
    assert all(a is b for a, b in zip(result["entries"], entries, strict=True))


def test_throughput_goal_stacks_entries_by_shape():
    entries = [torch.randn(1, 8, 64) for _ in range(5)] + [torch.randn(2, 4) for _ in range(2)] + [torch.randn(3)]
    result = PerformanceOptimizer().advanced_optimization(entries, "throughput")
    stacked = result["entries"]
    assert [tuple(s.shape) for s in stacked] == [(5, 1, 8, 64), (2, 2, 4), (1, 3)]
    assert torch.equal(stacked[0][3], entries[3]) and torch.equal(stacked[1][1], entries[6])
    assert result["optimized_count"] == 7  # the single (3,) entry had nothing to batch with
    assert result["metrics"]["groups"] == 3
    assert result["metrics"]["move_before_s"] > 0 and result["metrics"]["move_after_s"] > 0
