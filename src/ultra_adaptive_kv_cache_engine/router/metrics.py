"""`RouterMetrics`: what the router measures, as Prometheus metrics in a registry of its own (`uakv_router:`).

- `uakv_router:requests_total{instance}`: requests sent to each instance (a retry counts again);
- `uakv_router:retries_total`: requests sent again to another instance after one failed to connect;
- `uakv_router:upstream_errors_total{instance}`: connections or answers that failed;
- `uakv_router:no_instance_total`: requests answered 503 because no instance was healthy;
- `uakv_router:prefix_source_total{source}`: routed requests by where the chosen instance's match came from
  (`digest`: its reported cache digest, `text`: the text chunks routed there, `none`: a policy that does not look);
- `uakv_router:matched_blocks_total` / `uakv_router:prompt_blocks_total`: for `digest`, prompt blocks the chosen
  instance held / all full prompt blocks; `uakv_router:matched_chunks_total` / `uakv_router:prompt_chunks_total`:
  the same in text chunks for `text` (each ratio is the router's expected prefix hit rate);
- `uakv_router:digest_polls_total{instance,outcome}`: digest polls (`full`, `delta`, `failed`);
- `uakv_router:instance_digest_blocks{instance}` (gauge): block hashes in the instance's last digest (-1: none);
- `uakv_router:decisions_total{decision}`: cache_aware's choices (cache, new, balance);
- `uakv_router:instance_healthy{instance}`, `uakv_router:instance_in_flight{instance}` (gauges);
- `uakv_router:routing_seconds`: from the request's arrival at the router to its sending upstream.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .instances import Fleet, Match

PREFIX = "uakv_router:"
ROUTING_BUCKETS_S = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)


class RouterMetrics:
    """The router's metrics (see the module docstring); gauges are read from `fleet` at each scrape."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.registry = r = CollectorRegistry()
        p = PREFIX
        self.requests = Counter(f"{p}requests", "Requests sent to an instance.", ["instance"], registry=r)
        self.retries = Counter(f"{p}retries", "Requests sent again after an instance failed.", registry=r)
        self.upstream_errors = Counter(f"{p}upstream_errors", "Failed connections or answers.", ["instance"],
                                       registry=r)
        self.no_instance = Counter(f"{p}no_instance", "Requests answered 503: no healthy instance.", registry=r)
        self.matched_chunks = Counter(f"{p}matched_chunks", "Prompt chunks believed cached where sent (text).",
                                      registry=r)
        self.prompt_chunks = Counter(f"{p}prompt_chunks", "Prompt chunks of requests routed by text.", registry=r)
        self.sources = Counter(f"{p}prefix_source", "Routed requests by the source of their match.", ["source"],
                               registry=r)
        self.matched_blocks = Counter(f"{p}matched_blocks", "Prompt blocks held where sent (digest).", registry=r)
        self.prompt_blocks = Counter(f"{p}prompt_blocks", "Full prompt blocks of requests routed by digest.",
                                     registry=r)
        self.digest_polls = Counter(f"{p}digest_polls", "Cache digest polls, by outcome.", ["instance", "outcome"],
                                    registry=r)
        self.digest_blocks = Gauge(f"{p}instance_digest_blocks", "Block hashes in the instance's last digest.",
                                   ["instance"], registry=r)
        self.decisions = Counter(f"{p}decisions", "cache_aware decisions.", ["decision"], registry=r)
        self.healthy = Gauge(f"{p}instance_healthy", "1 when the instance takes requests.", ["instance"], registry=r)
        self.in_flight = Gauge(f"{p}instance_in_flight", "Requests in flight per instance.", ["instance"], registry=r)
        self.routing = Histogram(f"{p}routing_seconds", "Arrival at the router to sending upstream.",
                                 buckets=ROUTING_BUCKETS_S, registry=r)
        self._seen_decisions: dict[str, int] = {}

    def record_match(self, match: Match) -> None:
        """One routed request: the source of the chosen instance's match and its units."""
        self.sources.labels(source=match.source).inc()
        if match.source == "digest":
            self.prompt_blocks.inc(match.total)
            self.matched_blocks.inc(match.matched)
        elif match.source == "text":
            self.prompt_chunks.inc(match.total)
            self.matched_chunks.inc(match.matched)

    def exposition(self) -> bytes:
        for instance in self.fleet.instances:
            self.healthy.labels(instance=instance.url).set(1 if instance.healthy else 0)
            self.in_flight.labels(instance=instance.url).set(instance.in_flight)
            digest = instance.digest
            self.digest_blocks.labels(instance=instance.url).set(len(digest.held) if digest.ready else -1)
        for decision, count in getattr(self.fleet.policy, "decisions", {}).items():
            new = count - self._seen_decisions.get(decision, 0)
            if new > 0:
                self.decisions.labels(decision=decision).inc(new)
            self._seen_decisions[decision] = count
        return generate_latest(self.registry)
