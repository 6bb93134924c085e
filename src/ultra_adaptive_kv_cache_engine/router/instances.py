"""The instances behind the router: their health, their load and what they hold cached.

An `Instance` is healthy until a request to it fails to connect (or its health check fails); then it takes
no request until a health check (`GET /health`, 200) passes again, and the router forgets what it held. Its
load is the larger of the requests the router has in flight there and the `in_flight` its last health answer
reported (requests from other clients or routers included).

What it holds comes from one of two sources, per instance and request (`Fleet.choose`): its cache digest
(router/digests.py: the block hashes it reported, matched against the prompt's) when it reported one under the
router's tokenizer and the prompt could be tokenized, else the text chunks the router sent there
(router/prefixes.py). Both become the share of the prompt held, on one integer scale (`SHARE_SCALE`), so the
routing policy compares instances whatever the source of each. Everything here runs on the router's event
loop: no locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policies.fleet.routing import InstanceView, RoutingPolicy
from .digests import InstanceDigest, PromptBlocks
from .prefixes import InstancePrefixes

SHARE_SCALE = 1 << 20
"""The unit the policy compares: the share of the prompt held, times this."""


@dataclass
class Instance:
    """One `uakv serve` behind the router. Invariant: `in_flight` counts requests sent and not yet answered."""

    url: str
    prefixes: InstancePrefixes
    digest: InstanceDigest = field(default_factory=InstanceDigest)
    healthy: bool = True
    in_flight: int = 0
    reported_in_flight: int = 0
    routed: int = 0
    failures: int = 0

    @property
    def load(self) -> float:
        return float(max(self.in_flight, self.reported_in_flight))

    def mark_down(self) -> None:
        """The instance failed: no request until a health check passes; what it held is forgotten."""
        self.healthy = False
        self.failures += 1
        self.prefixes.clear()
        self.digest.clear()

    def mark_health(self, ok: bool, reported_in_flight: int = 0) -> None:
        if not ok:
            if self.healthy:
                self.mark_down()
            return
        self.healthy, self.reported_in_flight = True, reported_in_flight


@dataclass(frozen=True)
class Prompt:
    """What a request is matched by: its text chunks' digests and, when it could be tokenized, its blocks."""

    chunks: list[bytes]
    blocks: PromptBlocks | None = None
    tokenizer: str = ""  # the identity of the tokenizer that produced `blocks`


@dataclass(frozen=True)
class Match:
    """How much of a prompt an instance holds: `matched` of `total` leading units of `source` (digest: blocks,
    text: chunks, none: the policy does not look)."""

    matched: int
    total: int
    source: str

    @property
    def share(self) -> int:
        return self.matched * SHARE_SCALE // self.total if self.total else 0


def match(instance: Instance, prompt: Prompt) -> Match:
    """The instance's digest when it reported one under the prompt's tokenizer, else the text chunks."""
    digest = instance.digest
    if prompt.blocks is not None and digest.ready and digest.tokenizer == prompt.tokenizer:
        hashes = prompt.blocks.hashes(digest.key)
        return Match(digest.matched(hashes), len(hashes), "digest")
    return Match(instance.prefixes.matched(prompt.chunks), len(prompt.chunks), "text")


@dataclass(frozen=True)
class Choice:
    """A routing decision: the instance, and how much of the prompt it holds."""

    instance: Instance
    match: Match


@dataclass
class Fleet:
    """The instances and the routing policy choosing among the healthy ones."""

    instances: list[Instance]
    policy: RoutingPolicy

    @classmethod
    def of(cls, urls: tuple[str, ...], policy: RoutingPolicy, index_chunks: int) -> Fleet:
        return cls([Instance(url.rstrip("/"), InstancePrefixes(index_chunks)) for url in urls], policy)

    def choose(self, prompt: Prompt, exclude: set[str]) -> Choice | None:
        """The policy's choice among healthy instances not in `exclude` (urls); None when none is left."""
        live = [i for i in self.instances if i.healthy and i.url not in exclude]
        if not live:
            return None
        matches = [match(i, prompt) if self.policy.uses_cache else Match(0, 0, "none") for i in live]
        views = [InstanceView(m.share, i.load) for m, i in zip(matches, live, strict=True)]
        index = self.policy.choose(views, SHARE_SCALE)
        return Choice(live[index], matches[index])

    def any_healthy(self) -> Instance | None:
        return next((i for i in self.instances if i.healthy), None)
