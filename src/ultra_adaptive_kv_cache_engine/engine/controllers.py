"""`Controllers`: the adaptive controllers of one engine, acting on the live cache through the cache manager.

Built from the config's switches, the manager's tier controls (`manager.tier_controls()`: one `TierControl`
per resizable tier, fastest first) and block source (`manager.block_source()`), and a clock. Each controller
is None when its switch is off (or it has nothing to act on):
- `predictor` (`WorkloadPredictor`, when the prefetcher or the autoscaler is on): told of every request's
  blocks; its forecast drives the prefetcher and its hit-rate curve the autoscaler.
- `prefetcher` (`CachePrefetcher`, `enable_prefetcher`, needs a block source): each round, while the forecast's
  prefix reuse is at least `min_prefix_reuse` (a workload that never comes back gains nothing from promotion),
  the live conversations whose next turn is due within `lookahead_s`, at most as many as the forecast expects
  requests in that horizon (at least one), get their blocks promoted into the fastest tier, at most
  `fast_share` of that tier per round. Before any gap was measured a turn is expected after
  live conversations / request rate seconds.
- `autoscalers` (`AutoScaler`s, `enable_autoscaler`, need resizable tiers): one per kind of tier (memory and
  disk are different budgets; the memory one also heeds `pressure`). Each tier is bounded by
  [`floor_fraction` x its configured capacity (at least one block), its configured capacity]; its hit-rate
  model is the predictor's LRU curve shifted by the capacity of the faster tiers (what a tier evicts is
  demoted into the next, so tier i holds the blocks ranked just below the faster tiers'). Rounds before
  `min_requests` requests change nothing (an empty curve would shrink every tier to its floor).
- `metrics` (`AdvancedMetricsCollector`, `enable_metrics`): every request, tier usage and prefetches.

`on_request` is called by the model session after every request; `step()` runs one round (prefetch, then
autoscale), from the background thread every `config.controller_interval_s` seconds (`start` / `stop`) or
directly (tests, replays). Thread-safe: requests may arrive while a round runs; rounds never overlap.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cache.tier_controls import BlockSource, TierControl
from ..config import KVCacheConfig
from ..metrics import LOGGER_NAME, Counters
from ..policies.base import Clock
from ..types import TierKind
from .autoscaler import AutoScaler, ScaledTier, ScalingDecision
from .controls import MemoryPressure, SystemMemoryPressure
from .metrics_collector import AdvancedMetricsCollector
from .predictor import WorkloadPredictor
from .prefetcher import CachePrefetcher, PrefetchResult

LOGGER = logging.getLogger(LOGGER_NAME)
MIN_ACCESS_RATE = 1e-6
"""Block accesses per second the autoscaler assumes at least (see `_TierCurve`)."""


@dataclass(frozen=True)
class ControllerSettings:
    """The controllers' tuning (times in clock seconds; shares and fractions in (0, 1])."""

    lookahead_s: float = 3.0
    max_prefetch_blocks: int = 256
    fast_share: float = 0.5
    min_prefix_reuse: float = 0.05
    floor_fraction: float = 0.125
    min_requests: int = 32
    half_life_s: float = 60.0
    horizon_s: float = 10.0
    memory_reserve_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("lookahead_s", "half_life_s", "horizon_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive number of seconds")
        for name in ("fast_share", "floor_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in (0, 1]")
        if not 0 <= self.min_prefix_reuse <= 1:
            raise ValueError(f"min_prefix_reuse={self.min_prefix_reuse!r} must be in [0, 1]")
        for name, low in (("max_prefetch_blocks", 1), ("min_requests", 0), ("memory_reserve_bytes", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")


@dataclass(frozen=True)
class ControlRound:
    """What one `step` did: the prefetch (None: off or skipped) and each autoscaler's decision (none: off or
    still warming up)."""

    prefetch: PrefetchResult | None
    scaling: tuple[ScalingDecision, ...] = field(default=())


class _TierCurve:
    """`HitRateModel` of one tier: the predictor's LRU curve at (capacity of the faster tiers + capacity). Its
    access rate is never below `MIN_ACCESS_RATE`: a lull (a forecast of no accesses) is no evidence that memory
    buys nothing, so the curve still decides."""

    def __init__(self, predictor: WorkloadPredictor, faster: Sequence[TierControl]) -> None:
        self.predictor, self.faster = predictor, tuple(faster)

    def hit_rate(self, capacity_bytes: int) -> float:
        base = sum(c.usage().capacity_bytes or 0 for c in self.faster)
        return self.predictor.hit_rate(base + capacity_bytes)

    def access_rate(self, horizon_s: float) -> float:
        return max(MIN_ACCESS_RATE, self.predictor.access_rate(horizon_s))


class Controllers:
    """The controllers of one engine; see the module docstring. `block_bytes` is what one block takes in the
    tiers (its record's size: the predictor's unit and the scalers' step); `pressure` is the machine's memory
    (default: `SystemMemoryPressure` keeping `settings.memory_reserve_bytes`)."""

    def __init__(
        self,
        config: KVCacheConfig,
        tier_controls: Sequence[TierControl],
        block_source: BlockSource | None,
        block_bytes: int,
        clock: Clock | None = None,
        settings: ControllerSettings | None = None,
        pressure: MemoryPressure | None = None,
    ) -> None:
        if isinstance(block_bytes, bool) or not isinstance(block_bytes, int) or block_bytes < 1:
            raise ValueError(f"block_bytes={block_bytes!r} must be a positive integer")
        self.settings = settings or ControllerSettings()
        self.clock = clock or time.monotonic
        self.interval_s = float(config.controller_interval_s)
        self.block_bytes = block_bytes
        self.controls = tuple(tier_controls)
        self.source = block_source
        self.counters = Counters()
        wants_prefetch = config.enable_prefetcher and block_source is not None
        wants_scaling = config.enable_autoscaler and bool(self.controls)
        self.predictor = (WorkloadPredictor(self.clock, half_life_s=self.settings.half_life_s, unit_bytes=block_bytes)
                          if wants_prefetch or wants_scaling else None)  # fmt: skip
        self.prefetcher = (CachePrefetcher(block_source, block_source.fast_tier, self.clock, self.settings.lookahead_s,
                                           self.settings.max_prefetch_blocks)
                           if wants_prefetch and block_source is not None else None)  # fmt: skip
        self.autoscalers = self._scalers(pressure) if wants_scaling else ()
        self.metrics = AdvancedMetricsCollector(self.clock) if config.enable_metrics else None
        self._step_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _scalers(self, pressure: MemoryPressure | None) -> tuple[AutoScaler, ...]:
        assert self.predictor is not None
        groups: dict[TierKind | None, list[ScaledTier]] = {}
        for i, control in enumerate(self.controls):
            usage = control.usage()
            high = max(self.block_bytes, usage.capacity_bytes or 0)
            low = min(high, max(self.block_bytes, int(high * self.settings.floor_fraction)))
            model = _TierCurve(self.predictor, self.controls[:i])
            groups.setdefault(usage.kind, []).append(ScaledTier(control, model, low, high))
        scalers = []
        for kind, tiers in groups.items():
            smallest = min(t.max_bytes for t in tiers)
            step = max(1, smallest // 32 // self.block_bytes) * self.block_bytes
            memory = kind is TierKind.CPU
            watch = (pressure or SystemMemoryPressure(self.settings.memory_reserve_bytes)) if memory else None
            scalers.append(AutoScaler(tiers, sum(t.max_bytes for t in tiers), step, self.settings.horizon_s, watch))
        return tuple(scalers)

    @property
    def enabled(self) -> bool:
        """True if any controller is on (else `start` need not be called)."""
        return any((self.prefetcher, self.autoscalers, self.metrics))

    # -- requests -------------------------------------------------------------------------------------------
    def on_request(
        self, conversation_id: str | None, block_hashes: Sequence[bytes], hit_tiers: Sequence[str | None],
        ttft_s: float | None, prompt_tokens: int, cached_tokens: int,
    ) -> None:
        """One request served: its full blocks' hashes in prefix order, where each was found (`"pool"`, a tier
        name, None: computed), its time to first token (None: not measured) and its prompt and reused tokens.
        `conversation_id` (see `conversation_key`) names the conversation its next turn will continue."""
        if len(hit_tiers) != len(block_hashes):
            raise ValueError(f"{len(block_hashes)} block hashes for {len(hit_tiers)} hit tiers; expected one each")
        self.counters.add("requests")
        if self.predictor is not None:
            self.predictor.observe_request(block_hashes, self.block_bytes)
        if self.prefetcher is not None and conversation_id:
            self.prefetcher.on_request(conversation_id, block_hashes)
        if self.metrics is not None:
            self.metrics.record_request(block_hashes, hit_tiers, ttft_s, prompt_tokens, cached_tokens)

    # -- control rounds -------------------------------------------------------------------------------------
    def step(self) -> ControlRound:
        """One round: prefetch, then autoscale, then the tier gauges; returns what was done."""
        with self._step_lock:
            self.counters.add("rounds")
            prefetch = self._prefetch()
            scaling: tuple[ScalingDecision, ...] = ()
            if self.autoscalers and self.counters.get("requests") >= self.settings.min_requests:
                scaling = tuple(scaler.step() for scaler in self.autoscalers)
                self.counters.add("resizes", sum(len(d.resized) for d in scaling))
            if self.metrics is not None:
                for control in self.controls:
                    self.metrics.record_tier_usage(control.usage())
                if prefetch is not None:
                    self.metrics.record_prefetch(prefetch.promoted)
            return ControlRound(prefetch, scaling)

    def _prefetch(self) -> PrefetchResult | None:
        if self.prefetcher is None or self.predictor is None or self.source is None:
            return None
        forecast = self.predictor.forecast(self.settings.lookahead_s)
        if forecast.prefix_reuse < self.settings.min_prefix_reuse:
            self.counters.add("prefetch_skipped")
            return None
        live = self.prefetcher.live
        if live and forecast.request_rate > 0:
            self.prefetcher.default_gap_s = live / forecast.request_rate
        fast = next((c for c in self.controls if c.name == self.source.fast_tier), None)
        capacity = fast.usage().capacity_bytes if fast is not None else None
        budget = None if not capacity else max(1, int(capacity * self.settings.fast_share) // self.block_bytes)
        return self.prefetcher.step(max(1, math.ceil(forecast.expected_requests)), budget)

    def start(self) -> None:
        """Run `step` every `interval_s` seconds in a daemon thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="uakv-controllers", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the background thread after its current round (idempotent)."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.step()
            except Exception:  # a round that fails must not end the controllers
                self.counters.add("errors")
                LOGGER.exception("controller round failed")

    # -- read-outs ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """JSON-able state for `engine.get_stats()`: each controller's, None when it is off."""
        counters = self.counters.snapshot()
        return {
            "interval_s": self.interval_s,
            "running": self._thread is not None and self._thread.is_alive(),
            "rounds": counters.get("rounds", 0),
            "requests": counters.get("requests", 0),
            "errors": counters.get("errors", 0),
            "predictor": self._predictor_stats(),
            "prefetcher": None if self.prefetcher is None else {
                "live_conversations": self.prefetcher.live, "promoted_blocks": self.prefetcher.promoted_total,
                "skipped_rounds": counters.get("prefetch_skipped", 0)},
            "autoscaler": None if not self.autoscalers else {
                "resizes": counters.get("resizes", 0),
                "tiers": {t.control.name: _bounds(t) for s in self.autoscalers for t in s.tiers}},
            "metrics": None if self.metrics is None else self.metrics.snapshot(),
        }  # fmt: skip

    def _predictor_stats(self) -> dict[str, float] | None:
        if self.predictor is None:
            return None
        forecast = self.predictor.forecast(self.settings.lookahead_s)
        return {"request_rate": forecast.request_rate, "access_rate": forecast.access_rate,
                "prefix_reuse": forecast.prefix_reuse, "tracked_blocks": self.predictor.tracked_blocks}


def _bounds(tier: ScaledTier) -> dict[str, int | None]:
    return {"capacity_bytes": tier.control.usage().capacity_bytes, "min_bytes": tier.min_bytes,
            "max_bytes": tier.max_bytes}


def conversation_key(request: Mapping[str, Any]) -> str | None:
    """The conversation a request continues: its `conversation_id`, else its `user` (non-empty strings), else a
    digest of its opening messages (every message up to and including the first user message, which every
    later turn repeats); None for a request without messages (a bare prompt names no conversation)."""
    for name in ("conversation_id", "user"):
        value = request.get(name)
        if isinstance(value, str) and value:
            return f"{name}:{value}"
    messages = request.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        return None
    opening: list[Any] = []
    for message in messages:
        opening.append(message)
        if isinstance(message, Mapping) and message.get("role") == "user":
            break
    text = json.dumps(opening, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return "messages:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
