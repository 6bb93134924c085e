"""The fleet simulator: a trace through N instances, each with a local cache, an optional global tier shared
by all, and a routing policy choosing the instance of each request.

Rules (on top of the replay lab's, `replay.simulator`, whose `_Replay` each cache is, so a local cache counts
hits, stores and evictions exactly as one `uakv replay` cache of its capacity does):
- requests arrive at their trace timestamps; each instance prefills what it does not find at
  `prefill_tokens_per_s`, first come first served, and its load is the prefill it has queued (seconds);
- the routing policy (`routing.ROUTING_POLICIES`) sees, per instance, the leading blocks of the request it
  holds locally (only when the policy reads them) and its load; it picks one instance;
- the request's hits are the leading blocks found in that instance's cache, continued by the leading blocks
  found in the global tier after them (promoted: they cost a transfer, not a prefill);
- every block of the request then lands in the instance's cache (hits touched, misses and promoted blocks
  stored, by its eviction policy), and in the global tier (write-through: every block computed or used
  anywhere reaches it; those it holds are touched);
- the global tier is one cache of `global_tokens`, the same eviction policy, seen by every instance at once.
`one_cache` rows are the bound a fleet is measured against: one instance holding the summed capacity of the
fleet's local caches (no global tier, no routing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..registry import make_policy
from ..replay.simulator import CompiledTrace, RequestClock, _Replay
from .routing import InstanceView, make_routing_policy

ONE_CACHE = "one_cache"
"""The routing name of the bound: one cache of the fleet's summed local capacity."""


@dataclass(frozen=True)
class FleetSpec:
    """One fleet: `instances` caches of `local_tokens` tokens each, a global tier of `global_tokens` (0: none),
    `routing` (a `ROUTING_POLICIES` name, or ONE_CACHE for the bound) with its `routing_options`, `eviction`
    (a policy registry name) for every cache, and instances prefilling `prefill_tokens_per_s` each."""

    instances: int
    local_tokens: int
    global_tokens: int = 0
    routing: str = "cache_aware"
    eviction: str = "lru"
    prefill_tokens_per_s: float = 30_000.0
    routing_options: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("instances", "local_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"FleetSpec.{name}={value!r} must be a positive integer")
        if isinstance(self.global_tokens, bool) or not isinstance(self.global_tokens, int) or self.global_tokens < 0:
            raise ValueError(f"FleetSpec.global_tokens={self.global_tokens!r} must be an integer >= 0 (0: none)")
        if not self.prefill_tokens_per_s > 0:
            raise ValueError(f"FleetSpec.prefill_tokens_per_s={self.prefill_tokens_per_s!r} must be positive")


@dataclass(frozen=True)
class FleetResult:
    """What one fleet counted on one trace. Rates are of the trace's prompt tokens; `prefill_tokens_saved` is
    `local_hit_tokens + global_hit_tokens`; `busiest_share` is the busiest instance's prefilled tokens over
    the mean (1.0: perfectly even); `mean_queue_s` the mean wait before a request's prefill starts."""

    trace: str
    routing: str
    eviction: str
    instances: int
    local_tokens: int
    global_tokens: int
    requests: int
    tokens: int
    local_hit_tokens: int
    global_hit_tokens: int
    prefill_tokens_saved: int
    token_hit_rate: float
    local_hit_rate: float
    busiest_share: float
    mean_queue_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _leading(keys: Sequence[Any], start: int, resident: set[Any]) -> int:
    """The index of the first of keys[start:] that `resident` lacks (len(keys) when it holds them all)."""
    i = start
    while i < len(keys) and keys[i] in resident:
        i += 1
    return i


def _matched(keys: Sequence[Any], residents: Sequence[set[Any]]) -> list[int]:
    """Leading blocks of `keys` each cache holds; O(instances) for the first block, then only the holders."""
    matched = [0] * len(residents)
    alive = range(len(residents))
    for depth, key in enumerate(keys, 1):
        alive = [i for i in alive if key in residents[i]]
        if not alive:
            break
        for i in alive:
            matched[i] = depth
    return matched


def simulate_fleet(trace: CompiledTrace, arrivals_s: Sequence[float], spec: FleetSpec) -> FleetResult:
    """Replays `trace` (requests arriving at `arrivals_s`, seconds, non-decreasing) through the fleet `spec`."""
    if len(arrivals_s) != trace.requests:
        raise ValueError(f"arrivals_s has {len(arrivals_s)} times for {trace.requests} requests")
    one = spec.routing == ONE_CACHE
    count, capacity = (1, spec.instances * spec.local_tokens) if one else (spec.instances, spec.local_tokens)
    bt, clock = trace.block_tokens, RequestClock()
    if capacity // bt < 1:
        raise ValueError(f"local_tokens={spec.local_tokens} holds no block of {bt} tokens")
    caches = [_Replay(make_policy(spec.eviction, capacity, clock), capacity // bt, bt) for _ in range(count)]
    shared = (_Replay(make_policy(spec.eviction, spec.global_tokens, clock), spec.global_tokens // bt, bt)
              if spec.global_tokens >= bt and not one else None)
    router = make_routing_policy("round_robin" if one else spec.routing, **({} if one else spec.routing_options))
    residents = [c.resident for c in caches]
    busy_until = [0.0] * count
    prefilled = [0] * count
    local_hits = global_hits = 0
    waited = 0.0
    for r, (keys, tokens, now) in enumerate(zip(trace.keys, trace.tokens, arrivals_s, strict=True)):
        clock.now = r
        loads = [max(0.0, b - now) for b in busy_until]
        matched = _matched(keys, residents) if router.uses_cache else [0] * count
        chosen = router.choose([InstanceView(m, load) for m, load in zip(matched, loads, strict=True)], len(keys))
        cache = caches[chosen]
        usable = keys[: cache.slots]
        local = _leading(usable, 0, cache.resident)
        reach = _leading(usable, local, shared.resident) if shared is not None else local
        if shared is not None:
            shared.request(keys, tokens, None)
        cache.request(keys, tokens, None)
        local_tokens = min(local * bt, tokens)
        hit_tokens = min(reach * bt, tokens)
        local_hits += local_tokens
        global_hits += hit_tokens - local_tokens
        start = max(now, busy_until[chosen])
        waited += start - now
        busy_until[chosen] = start + (tokens - hit_tokens) / spec.prefill_tokens_per_s
        prefilled[chosen] += tokens - hit_tokens
    total = trace.total_tokens
    mean_prefilled = sum(prefilled) / count
    return FleetResult(
        trace=trace.name, routing=spec.routing, eviction=spec.eviction, instances=spec.instances,
        local_tokens=spec.local_tokens, global_tokens=spec.global_tokens if shared is not None else 0,
        requests=trace.requests, tokens=total, local_hit_tokens=local_hits, global_hit_tokens=global_hits,
        prefill_tokens_saved=local_hits + global_hits,
        token_hit_rate=(local_hits + global_hits) / total if total else 0.0,
        local_hit_rate=local_hits / total if total else 0.0,
        busiest_share=max(prefilled) / mean_prefilled if mean_prefilled else 1.0,
        mean_queue_s=waited / trace.requests if trace.requests else 0.0,
    )
