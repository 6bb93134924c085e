"""`RouterConfig`: what `uakv route` fronts and how it chooses. Frozen, validated, the only place the router's
defaults live; `uakv route` has one option per field (router/commands.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from ..policies.fleet.routing import ROUTING_POLICIES

API_KEY_ENV = "UAKV_API_KEY"
PREFIX_SOURCES = ("digest", "text")
"""digest: each instance's GET /v1/cache/digest, matched against the prompt's block hashes (the router tokenizes
as the instances do); text: the prompt text chunks the router sent to each instance (no tokenizer, no polls)."""


def _check_number(name: str, value: Any, low: float, integer: bool = False) -> None:
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value < low:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"RouterConfig.{name}={value!r}; expected {kind} >= {low:g}")


@dataclass(frozen=True)
class RouterConfig:
    """The instances behind the router, where it listens, and its routing policy with its knobs."""

    instances: tuple[str, ...] = field(default=(), metadata={
        "help": "base URLs of the `uakv serve` instances, comma-separated (http://127.0.0.1:8001,...)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    policy: str = field(default="cache_aware", metadata={
        "help": f"routing policy: {', '.join(sorted(ROUTING_POLICIES))}"})
    balance_abs: float = field(default=4.0, metadata={
        "help": "cache_aware: requests in flight over the least loaded instance before the longest prefix yields"})
    balance_rel: float = field(default=1.5, metadata={
        "help": "cache_aware: ... and the factor over the least load it must also exceed"})
    cache_threshold: float = field(default=0.5, metadata={
        "help": "cache_aware: shortest cached share of a prompt routed by prefix (below it: least loaded)"})
    chunk_chars: int = field(default=128, metadata={
        "help": "prompt characters per prefix chunk the router remembers per instance"})
    index_chunks: int = field(default=65536, metadata={
        "help": "prefix chunks remembered per instance (least recently routed forgotten first)"})
    prefix_source: str = field(default="digest", metadata={
        "help": "what the router matches prompts against: digest (each instance's GET /v1/cache/digest, prompts "
                "tokenized as the instances do; text chunks for an instance that offers none) or text (the text "
                "chunks routed to each instance; no tokenizer, no polls)"})
    digest_interval_s: float = field(default=0.5, metadata={
        "help": "seconds between polls of an instance's cache digest (it is also polled after each answer)"})
    model_path: str | None = field(default=None, metadata={
        "help": "the model the instances serve, for its tokenizer and chat template, as uakv serve's --model-path "
                "(default: the embedded SmolLM2); none for the default"})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": f"the instances' API key, sent with the digest polls (clients send their own); env {API_KEY_ENV}"})
    health_interval_s: float = field(default=1.0, metadata={"help": "seconds between health checks of an instance"})
    connect_timeout_s: float = field(default=2.0, metadata={"help": "connect timeout to an instance (then: the next)"})
    request_timeout_s: float = field(default=600.0, metadata={"help": "read timeout of an instance's answer"})
    max_body_bytes: int = field(default=1024**2, metadata={"help": "largest request body accepted (413 above)"})

    def __post_init__(self) -> None:
        if isinstance(self.instances, str) or not isinstance(self.instances, tuple):
            raise ValueError(f"RouterConfig.instances={self.instances!r} must be a tuple of base URLs")
        for url in self.instances:
            parts = urlsplit(url) if isinstance(url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"RouterConfig.instances: {url!r} is not a base URL such as http://127.0.0.1:8001")
        if len(set(self.instances)) != len(self.instances):
            raise ValueError(f"RouterConfig.instances={self.instances!r} names an instance twice")
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"RouterConfig.policy={self.policy!r}; expected one of: {', '.join(sorted(ROUTING_POLICIES))}")
        if self.prefix_source not in PREFIX_SOURCES:
            raise ValueError(f"RouterConfig.prefix_source={self.prefix_source!r}; expected one of: "
                             f"{', '.join(PREFIX_SOURCES)}")
        for name in ("model_path", "api_key"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"RouterConfig.{name}={value!r}; expected a non-empty string or None")
        _check_number("port", self.port, 0, integer=True)
        if self.port > 65535:
            raise ValueError(f"RouterConfig.port={self.port!r}; expected an integer in 0..65535")
        _check_number("balance_abs", self.balance_abs, 0)
        _check_number("balance_rel", self.balance_rel, 1)
        _check_number("cache_threshold", self.cache_threshold, 0)
        if self.cache_threshold > 1:
            raise ValueError(f"RouterConfig.cache_threshold={self.cache_threshold!r}; expected a share in [0, 1]")
        for name in ("chunk_chars", "index_chunks", "max_body_bytes"):
            _check_number(name, getattr(self, name), 1, integer=True)
        for name in ("digest_interval_s", "health_interval_s", "connect_timeout_s", "request_timeout_s"):
            _check_number(name, getattr(self, name), 1e-3)

    def with_env(self, environ: Mapping[str, str]) -> RouterConfig:
        """This config with `api_key` taken from UAKV_API_KEY when it has none (an explicit key wins)."""
        key = environ.get(API_KEY_ENV)
        return self if self.api_key is not None or not key else replace(self, api_key=key)

    @property
    def policy_options(self) -> dict[str, float]:
        """The routing policy's constructor options (only cache_aware takes any)."""
        if self.policy != "cache_aware":
            return {}
        return {"balance_abs": self.balance_abs, "balance_rel": self.balance_rel,
                "cache_threshold": self.cache_threshold}
