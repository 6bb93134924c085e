"""Fleets: routing policies (which instance serves a request) and the fleet simulator (a trace through N
instances with local caches, an optional global tier and a routing policy; `uakv fleet-sim`)."""

from .plot import plot_fleet
from .routing import (
    ROUTING_POLICIES,
    CacheAwarePolicy,
    InstanceView,
    LeastLoadedPolicy,
    RoundRobinPolicy,
    RoutingPolicy,
    make_routing_policy,
)
from .runner import FleetSweep, load_compiled, parse_sizes, parse_tokens, run_fleet
from .simulator import ONE_CACHE, FleetResult, FleetSpec, simulate_fleet

__all__ = [
    "ONE_CACHE", "ROUTING_POLICIES", "CacheAwarePolicy", "FleetResult", "FleetSpec", "FleetSweep", "InstanceView",
    "LeastLoadedPolicy", "RoundRobinPolicy", "RoutingPolicy", "load_compiled", "make_routing_policy", "parse_sizes",
    "parse_tokens", "plot_fleet", "run_fleet", "simulate_fleet",
]
