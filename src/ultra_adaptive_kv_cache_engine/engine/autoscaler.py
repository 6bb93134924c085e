"""`AutoScaler`: splits a memory budget between tiers by their predicted hit-rate curves, within bounds.

Each scaled tier comes with a `HitRateModel` of its own stream (a `WorkloadPredictor`), a value per hit and
[min, max] capacity bounds. A plan:
1. the budget is `budget_bytes`, lowered under memory pressure to what the tiers hold now plus what the
   machine can still give (never below the sum of minimums: bounds are a promise);
2. every tier starts at its minimum; the rest is handed out in `step_bytes` units by UCP's lookahead: for
   each tier the best expected-hits-per-byte gain over every possible grant (so a working set that only
   pays once it fits whole is still found), the best tier gets its grant, repeat;
3. memory that buys no more hits is not handed out (`unallocated_bytes`): the scaler shrinks as well as grows.
`step()` applies a plan through `TierControl.resize`, skipping changes smaller than `min_change_bytes`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..cache.tier_controls import TierControl
from .controls import HitRateModel, MemoryPressure


@dataclass(frozen=True)
class ScaledTier:
    """One tier under the scaler: its control, its hit-rate model, capacity bounds (bytes), value per hit."""

    control: TierControl
    model: HitRateModel
    min_bytes: int
    max_bytes: int
    hit_value: float = 1.0

    def __post_init__(self) -> None:
        for name in ("min_bytes", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (bytes)")
        if self.max_bytes < self.min_bytes:
            raise ValueError(f"max_bytes={self.max_bytes} must be >= min_bytes={self.min_bytes}")
        if not self.hit_value >= 0:
            raise ValueError(f"hit_value={self.hit_value!r} must be >= 0")


@dataclass(frozen=True)
class ScalingDecision:
    """A plan: target capacity per tier, the budget it used, and the expected hits per second it buys."""

    capacities: Mapping[str, int]
    budget_bytes: int
    unallocated_bytes: int
    expected_hits_per_s: float
    resized: tuple[str, ...] = ()


class _Curve:
    """A hit-rate model's curve, memoised over the capacities one plan asks about."""

    def __init__(self, model: HitRateModel) -> None:
        self.model = model
        self._memo: dict[int, float] = {}

    def __call__(self, capacity: int) -> float:
        value = self._memo.get(capacity)
        if value is None:
            value = self._memo[capacity] = self.model.hit_rate(capacity)
        return value


class AutoScaler:
    """See the module docstring. `horizon_s` is how far ahead the access rates are forecast."""

    def __init__(
        self,
        tiers: Sequence[ScaledTier],
        budget_bytes: int,
        step_bytes: int,
        horizon_s: float = 10.0,
        pressure: MemoryPressure | None = None,
        min_change_bytes: int | None = None,
    ) -> None:
        tiers = tuple(tiers)
        if not tiers or not all(isinstance(t, ScaledTier) for t in tiers):
            raise ValueError(f"tiers={tiers!r} must be a non-empty sequence of ScaledTier")
        names = [t.control.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names {names} must be distinct")
        for name, value in (("budget_bytes", budget_bytes), ("step_bytes", step_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer (bytes)")
        floor = sum(t.min_bytes for t in tiers)
        if budget_bytes < floor:
            raise ValueError(f"budget_bytes={budget_bytes} is below the sum of the tiers' min_bytes ({floor})")
        if not horizon_s > 0:
            raise ValueError(f"horizon_s={horizon_s!r} must be positive")
        self.tiers = tiers
        self.budget_bytes = budget_bytes
        self.step_bytes = step_bytes
        self.horizon_s = horizon_s
        self.pressure = pressure
        self.min_change_bytes = step_bytes if min_change_bytes is None else min_change_bytes

    def effective_budget(self) -> int:
        """The budget now: `budget_bytes`, capped by current capacities plus available memory, >= minimums."""
        floor = sum(t.min_bytes for t in self.tiers)
        if self.pressure is None:
            return self.budget_bytes
        held = sum(t.control.usage().capacity_bytes or 0 for t in self.tiers)
        return max(floor, min(self.budget_bytes, held + self.pressure.available_bytes()))

    def plan(self) -> ScalingDecision:
        """Target capacities by lookahead allocation; changes nothing."""
        budget = self.effective_budget()
        capacity = [t.min_bytes for t in self.tiers]
        rates = [t.model.access_rate(self.horizon_s) * t.hit_value for t in self.tiers]
        curves = [_Curve(t.model) for t in self.tiers]
        left = budget - sum(capacity)
        while left >= self.step_bytes:
            best: tuple[float, int, int] | None = None  # (gain per byte, tier index, grant bytes)
            for i, tier in enumerate(self.tiers):
                grant = self._best_grant(tier, curves[i], rates[i], capacity[i], left)
                if grant is not None and (best is None or grant[0] > best[0]):
                    best = (grant[0], i, grant[1])
            if best is None:
                break
            _, i, grant_bytes = best
            capacity[i] += grant_bytes
            left -= grant_bytes
        hits = sum(r * curve(c) for r, curve, c in zip(rates, curves, capacity, strict=True))
        targets = {t.control.name: c for t, c in zip(self.tiers, capacity, strict=True)}
        return ScalingDecision(targets, budget, left, hits)

    def _best_grant(
        self, tier: ScaledTier, curve: _Curve, rate: float, current: int, left: int
    ) -> tuple[float, int] | None:
        """(gain per byte, bytes) of the grant of whole steps with the best gain per byte; None if none gains.
        Ties go to the smaller grant."""
        if rate <= 0:
            return None
        base = curve(current)
        best: tuple[float, int] | None = None
        steps = min(left, tier.max_bytes - current) // self.step_bytes
        for k in range(1, steps + 1):
            grant = k * self.step_bytes
            gain = rate * (curve(current + grant) - base) / grant
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, grant)
        return best

    def step(self) -> ScalingDecision:
        """Plan, then resize every tier whose target differs from its capacity by >= `min_change_bytes`."""
        decision = self.plan()
        changes: list[tuple[int, str, TierControl]] = []
        for tier in self.tiers:
            name = tier.control.name
            current = tier.control.usage().capacity_bytes
            target = decision.capacities[name]
            if current is None or abs(target - current) >= max(1, self.min_change_bytes):
                changes.append((target - (current or 0), name, tier.control))
        resized: list[str] = []
        for _, name, control in sorted(changes, key=lambda c: c[0]):  # shrink first: the sum never overshoots
            control.resize(decision.capacities[name])
            resized.append(name)
        return ScalingDecision(
            decision.capacities, decision.budget_bytes, decision.unallocated_bytes,
            decision.expected_hits_per_s, tuple(resized),
        )  # fmt: skip
