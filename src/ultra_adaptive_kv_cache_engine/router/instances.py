"""The instances behind the router: their health, their load and what the router believes they have cached.

An `Instance` is healthy until a request to it fails to connect (or its health check fails); then it takes
no request until a health check (`GET /health`, 200) passes again, and the router forgets what it believed
it cached. Its load is the larger of the requests the router has in flight there and the `in_flight` its last
health answer reported (requests from other clients or routers included). Everything here runs on the
router's event loop: no locks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..policies.fleet.routing import InstanceView, RoutingPolicy
from .prefixes import InstancePrefixes


@dataclass
class Instance:
    """One `uakv serve` behind the router. Invariant: `in_flight` counts requests sent and not yet answered."""

    url: str
    prefixes: InstancePrefixes
    healthy: bool = True
    in_flight: int = 0
    reported_in_flight: int = 0
    routed: int = 0
    failures: int = 0

    @property
    def load(self) -> float:
        return float(max(self.in_flight, self.reported_in_flight))

    def mark_down(self) -> None:
        """The instance failed: no request until a health check passes; its believed cache is forgotten."""
        self.healthy = False
        self.failures += 1
        self.prefixes.clear()

    def mark_health(self, ok: bool, reported_in_flight: int = 0) -> None:
        if not ok:
            if self.healthy:
                self.mark_down()
            return
        self.healthy, self.reported_in_flight = True, reported_in_flight


@dataclass(frozen=True)
class Choice:
    """A routing decision: the instance, and how many leading prompt chunks it was believed to hold."""

    instance: Instance
    matched: int


@dataclass
class Fleet:
    """The instances and the routing policy choosing among the healthy ones."""

    instances: list[Instance]
    policy: RoutingPolicy

    @classmethod
    def of(cls, urls: tuple[str, ...], policy: RoutingPolicy, index_chunks: int) -> Fleet:
        return cls([Instance(url.rstrip("/"), InstancePrefixes(index_chunks)) for url in urls], policy)

    def choose(self, digests: list[bytes], exclude: set[str]) -> Choice | None:
        """The policy's choice among healthy instances not in `exclude` (urls); None when none is left."""
        live = [i for i in self.instances if i.healthy and i.url not in exclude]
        if not live:
            return None
        cached = self.policy.uses_cache
        matched = [i.prefixes.matched(digests) if cached else 0 for i in live]
        views = [InstanceView(m, i.load) for m, i in zip(matched, live, strict=True)]
        index = self.policy.choose(views, len(digests))
        return Choice(live[index], matched[index])

    def any_healthy(self) -> Instance | None:
        return next((i for i in self.instances if i.healthy), None)
