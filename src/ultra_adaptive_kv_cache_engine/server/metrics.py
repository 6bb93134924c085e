"""`ServerMetrics`: what the HTTP server measures, as Prometheus metrics in a registry of its own, named after
vLLM's `vllm:` metrics with the `uakv:` prefix.

- `uakv:num_requests_running` / `uakv:num_requests_waiting` (gauges): admitted requests that have produced a
  first token / that have not yet;
- `uakv:request_success_total{finished_reason}`: finished requests by reason (stop, length, cancelled: the
  client went away);
- `uakv:request_errors_total{status}`: requests answered with an error status (400, 401, 404, 413, 429, 500);
- `uakv:prompt_tokens_total`, `uakv:prompt_tokens_cached_total` (reused from the prefix cache),
  `uakv:generation_tokens_total`;
- `uakv:request_time_to_first_token_seconds`: from the request's admission to its first token, queueing
  included (the engine's own `uakv:time_to_first_token_seconds` starts inside the engine);
- `uakv:inter_token_latency_seconds`: between two streamed steps, per token;
- `uakv:e2e_request_latency_seconds`: from admission to the last token.

`exposition()` is this registry's text followed by the engine collector's (when the engine has one); the
names above never collide with the collector's.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "uakv:"
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0)
ITL_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                 120.0)


class ServerMetrics:
    """The server's metrics (see the module docstring); `engine_exposition` returns the engine collector's
    text at each scrape (None: the engine has no collector)."""

    def __init__(self, engine_exposition: Callable[[], bytes | None] | None = None) -> None:
        self.engine_exposition = engine_exposition
        self.registry = CollectorRegistry()
        r, p = self.registry, PREFIX
        self.running = Gauge(f"{p}num_requests_running", "Requests producing tokens.", registry=r)
        self.waiting = Gauge(f"{p}num_requests_waiting", "Admitted requests without a first token yet.",
                             registry=r)
        self.success = Counter(f"{p}request_success", "Finished requests, by finish reason.", ["finished_reason"],
                               registry=r)
        self.errors = Counter(f"{p}request_errors", "Requests answered with an error, by HTTP status.",
                              ["status"], registry=r)
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.cached_tokens = Counter(f"{p}prompt_tokens_cached", "Prompt tokens reused from the prefix cache.",
                                     registry=r)
        self.generation_tokens = Counter(f"{p}generation_tokens", "Generated tokens.", registry=r)
        self.ttft = Histogram(f"{p}request_time_to_first_token_seconds",
                              "From admission to the first token, queueing included.", buckets=TTFT_BUCKETS_S,
                              registry=r)
        self.itl = Histogram(f"{p}inter_token_latency_seconds", "Time between two generated tokens.",
                             buckets=ITL_BUCKETS_S, registry=r)
        self.e2e = Histogram(f"{p}e2e_request_latency_seconds", "From admission to the last token.",
                             buckets=E2E_BUCKETS_S, registry=r)

    def record_error(self, status: int) -> None:
        self.errors.labels(status=str(status)).inc()

    def record_finished(self, reason: str, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
        self.success.labels(finished_reason=reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.generation_tokens.inc(completion_tokens)

    def exposition(self) -> bytes:
        """The Prometheus text of this registry, then the engine collector's."""
        own = generate_latest(self.registry)
        engine = self.engine_exposition() if self.engine_exposition is not None else None
        return own + engine if engine else own
