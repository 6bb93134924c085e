"""The trace-replay lab: Mooncake-schema traces (real or synthetic) through the policies, with Belady's bound."""

from .belady import BeladyPolicy, next_uses
from .plot import plot_hit_rates
from .runner import BELADY, ReplayResult, run_replay
from .simulator import CompiledTrace, ReplayCounts, compile_trace, simulate
from .trace import TraceRequest, load_trace, parse_request, save_trace
from .workloads import WORKLOADS, WorkloadSpec, generate_workload

__all__ = [
    "BELADY", "BeladyPolicy", "CompiledTrace", "ReplayCounts", "ReplayResult", "TraceRequest", "WORKLOADS",
    "WorkloadSpec", "compile_trace", "generate_workload", "load_trace", "next_uses", "parse_request", "plot_hit_rates",
    "run_replay", "save_trace", "simulate",
]
