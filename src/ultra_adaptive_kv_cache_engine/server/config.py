"""`ServerConfig`: where `uakv serve` listens and what it admits. Frozen, validated, the only place the
server's defaults live; `with_env` adds the API key from `UAKV_API_KEY` when none is given."""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

API_KEY_ENV = "UAKV_API_KEY"


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"ServerConfig.{name}={value!r}; expected {expected}")


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server runs. Every limit is checked per request and answered with an OpenAI error."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to bind (loopback by default)"})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port)"})
    api_key: str | None = field(default=None, repr=False, metadata={
        "help": f"clients must send 'Authorization: Bearer KEY' (every route but /health); env {API_KEY_ENV}"})
    model_name: str | None = field(default=None, metadata={
        "help": "the model id clients name (default: the engine's model id)"})
    max_body_bytes: int = field(default=1024**2, metadata={"help": "largest request body accepted (413 above)"})
    max_prompt_tokens: int | None = field(default=None, metadata={
        "help": "longest prompt accepted, in tokens (default: the model's context)"})
    max_tokens_limit: int = field(default=4096, metadata={"help": "largest max_tokens a request may ask for"})
    max_queue: int = field(default=256, metadata={
        "help": "requests in flight (running + waiting) before new ones get 429"})
    retry_after_s: int = field(default=1, metadata={"help": "the Retry-After of a 429 answer, in seconds"})
    drain_timeout_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM, how long in-flight requests may take to finish"})

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"ServerConfig.host={self.host!r}; expected a non-empty host name or IP address")
        if isinstance(self.port, bool) or not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port={self.port!r}; expected an integer from 0 to 65535")
        for name in ("api_key", "model_name"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"ServerConfig.{name}={value!r}; expected a non-empty string or None")
        _positive_int("max_body_bytes", self.max_body_bytes)
        _positive_int("max_prompt_tokens", self.max_prompt_tokens, allow_none=True)
        _positive_int("max_tokens_limit", self.max_tokens_limit)
        _positive_int("max_queue", self.max_queue)
        _positive_int("retry_after_s", self.retry_after_s)
        drain = self.drain_timeout_s
        if isinstance(drain, bool) or not isinstance(drain, int | float) or not math.isfinite(drain) or drain < 0:
            raise ValueError(f"ServerConfig.drain_timeout_s={drain!r}; expected a finite number of seconds >= 0")

    @property
    def is_loopback(self) -> bool:
        """True when the server is reachable from this machine only."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def with_env(self, environ: Mapping[str, str]) -> ServerConfig:
        """This config with `api_key` taken from UAKV_API_KEY when it has none (an explicit key wins)."""
        key = environ.get(API_KEY_ENV)
        if self.api_key is not None or not key:
            return self
        return replace(self, api_key=key)
