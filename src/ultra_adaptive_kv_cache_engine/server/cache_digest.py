"""`CacheDigest`: the block hashes this instance can serve from its own memory and disk, for routers
(`GET /v1/cache/digest`, behind the API key like every route but /health).

A router that knows which prompt prefixes each instance holds sends a request where the longest one is (the
manner of Dynamo's KV-aware router and SGLang's cache-aware router). The instance names what it holds exactly
as its cache does: the chained block hashes (`prefix/hashing.py`) of its pool's index and of its local tiers
(`KVCacheManager.held_blocks`: memory and disk, not Redis, which the whole fleet shares). A router tokenizes a
prompt as the instance does, chains the same hashes from the `namespace` digest and matches them.

The answer (JSON): `object` "cache.digest", `instance` (random per process), `model` (the served name),
`namespace` (hex of the namespace digest the hashes chain from), `tokenizer` (the tokenizer's identity),
`block_size`, `hash_bytes`, `generation`, then either `full: true` and `blocks` (every hash held) or
`full: false`, `since`, `added` and `removed` (the changes since generation `since`), and `pool` (`blocks`,
`free`, `sequences`: the pool's occupancy). Hashes are hex, sorted, truncated to `hash_bytes` (8) of their 32
bytes: two of n held blocks collide with probability about n^2 / 2^65 (3e-12 for n = 10^4), a prompt block
falsely matches one of them with probability n / 2^64 (5e-16), and either only sends a request to an
instance that then recomputes the block: the instance matches full hashes, so a wrong answer cannot follow.

Generations: every report takes a snapshot; when it differs from the previous one the generation grows by one
and the difference is kept (the last `history` differences). `?since=G` answers the changes since G when the
kept differences reach back to G (`full: false`), else everything (`full: true`: G from before a restart, or
too old, or from the future). Generations start at the process's start time in microseconds, so a restarted
instance never reuses a number of its previous life. A `since` that is not a non-negative integer, or any
other query parameter, is a 400 OpenAI error naming it.

Cost: a snapshot is a C-speed copy of the index's keys under the cache lock, the local tiers' key lists and two
C-speed set differences, in a worker thread (never the step loop, no Python loop over the pool); a full answer
formats every hash (about 190 KB of JSON for 10^4 blocks), a delta only the changes.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse

from .errors import bad_request

if TYPE_CHECKING:
    from ..cache.manager import KVCacheManager
    from ..cache.results import HeldBlocks
    from ..prefix.namespace import Namespace

HASH_BYTES = 8
HISTORY = 256
QUERY_PARAMETERS = ("since",)

Change = tuple[int, frozenset[bytes], frozenset[bytes]]
"""(generation, hashes added, hashes removed) going from generation - 1 to generation."""


class CacheDigest:
    """Snapshots of `held()` with generations and their differences (see the module docstring). Thread-safe."""

    def __init__(self, held: Callable[[], HeldBlocks], namespace: Namespace, model: str,
                 hash_bytes: int = HASH_BYTES, history: int = HISTORY, first_generation: int | None = None) -> None:
        if isinstance(hash_bytes, bool) or not isinstance(hash_bytes, int) or not 4 <= hash_bytes <= 32:
            raise ValueError(f"hash_bytes={hash_bytes!r}; expected an integer from 4 to 32")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history={history!r}; expected a positive integer")
        self._held, self.namespace, self.model, self.hash_bytes = held, namespace, model, hash_bytes
        self.instance = secrets.token_hex(8)
        self.generation = time.time_ns() // 1000 if first_generation is None else first_generation
        self._blocks: frozenset[bytes] = frozenset()
        self._changes: deque[Change] = deque(maxlen=history)
        self._lock = threading.Lock()

    @classmethod
    def of(cls, manager: KVCacheManager, model: str) -> CacheDigest:
        """The digest of `manager`'s blocks, served under the model name `model`."""
        return cls(manager.held_blocks, manager.namespace, model)

    def report(self, since: int | None = None) -> dict[str, Any]:
        """The answer of `GET /v1/cache/digest[?since=G]` now (a new snapshot first)."""
        with self._lock:
            held = self._held()
            self._advance(frozenset(held.pool).union(held.local_tiers))
            body: dict[str, Any] = {
                "object": "cache.digest", "instance": self.instance, "model": self.model,
                "namespace": self.namespace.digest.hex(), "tokenizer": self.namespace.tokenizer_id,
                "block_size": self.namespace.block_size, "hash_bytes": self.hash_bytes, "generation": self.generation,
            }
            delta = self._changes_since(since) if since is not None else None
            if delta is None:
                body.update(full=True, blocks=self._hex(self._blocks))
            else:
                body.update(full=False, since=since, added=self._hex(delta[0]), removed=self._hex(delta[1]))
        body["pool"] = {"blocks": held.num_blocks, "free": held.free_blocks, "sequences": held.sequences}
        return body

    def _advance(self, now: frozenset[bytes]) -> None:
        if now == self._blocks:
            return
        self.generation += 1
        self._changes.append((self.generation, now - self._blocks, self._blocks - now))
        self._blocks = now

    def _changes_since(self, since: int) -> tuple[frozenset[bytes], frozenset[bytes]] | None:
        """(added, removed) from generation `since` to now; None when the kept differences do not reach it."""
        if since == self.generation:
            return frozenset(), frozenset()
        if since > self.generation or not self._changes or since < self._changes[0][0] - 1:
            return None
        added: frozenset[bytes] = frozenset()
        removed: frozenset[bytes] = frozenset()
        for generation, plus, minus in self._changes:
            if generation > since:  # state' = (state - minus) | plus, composed
                added = (added - minus) | plus
                removed = (removed | minus) - added
        return added, removed

    def _hex(self, hashes: Iterable[bytes]) -> list[str]:
        n = self.hash_bytes
        return sorted(h[:n].hex() for h in hashes)


def parse_since(params: QueryParams) -> int | None:
    """The `since` generation of the query (None when absent); 400 for anything else the query holds."""
    unknown = sorted(set(params.keys()) - set(QUERY_PARAMETERS))
    if unknown:
        raise bad_request(f"unknown query parameter(s) {unknown}; expected: {', '.join(QUERY_PARAMETERS)}",
                          param=unknown[0])
    values = params.getlist("since")
    if not values:
        return None
    value = values[0]
    if len(values) > 1 or not (value.isascii() and value.isdigit()):
        shown = values if len(values) > 1 else value
        raise bad_request(f"since={shown!r} is invalid; expected one generation number (a non-negative integer) "
                          "from an earlier digest", param="since")
    return int(value)


def digest_endpoint(digest: CacheDigest) -> Callable[[Request], Awaitable[JSONResponse]]:
    """The `GET /v1/cache/digest` handler over `digest` (the snapshot runs in a worker thread)."""

    async def cache_digest(request: Request) -> JSONResponse:
        since = parse_since(request.query_params)
        return JSONResponse(await asyncio.to_thread(digest.report, since))

    return cache_digest
