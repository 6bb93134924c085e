"""`RedisTier`: blocks in a shared Redis or Valkey, single node or Redis Cluster, through one class.

Keys are `<prefix><namespace hex>:<block hash hex>`; values are the serialised records, verified on every read
(checksum, block hash, namespace). With a `secret` (config `tier_secret` / `UAKV_TIER_SECRET`), keys are
`<prefix><scope>:<HMAC name>` and values carry an HMAC tag (`tiers/auth.py`): a party with write access to
Redis can then neither forge a block nor probe which prompts were sent. Without one the tier logs a warning at
construction: anyone who can write to that Redis can then change what tenants are served. A value that fails
(bad tag, bad checksum, another namespace, a value that is not a string, e.g. a list) is never served: it is
counted (`corrupt_dropped` / `namespace_dropped`) and deleted, and the rest of a pipelined lookup goes on.

URLs are validated at construction (`parse_redis_url`): redis://host[:port]/db, rediss://..., unix:///path.
Cluster mode is chosen by `cluster=True` or by `?cluster=true` in the URL (removed before the URL reaches
redis-py); the client is then `redis.cluster.RedisCluster`, which follows slots and MOVED redirections itself.

Failure contract: no Redis error ever reaches the caller, and an unreachable, slow or wrong Redis costs only
its hits. Reads on the request path wait at most `read_timeout_s` (a SIGSTOPped server, a black-holed host);
writes (background threads) at most `timeout_s`. A failed call counts in `errors`, opens the circuit breaker
(logged once per outage) and returns a miss / `PutResult(stored=False)`; while it is open every call returns
at once (`unavailable` counts them). Every `retry_interval_s` seconds a background thread probes (connect +
PING); when one answers the breaker closes (`reconnects`, an info line). `usage().healthy` and `last_error`
show the state. Capacity is Redis's own business (`maxmemory`; optional `ttl_s` per key): sizes are None.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from ..config import parse_redis_url
from ..policies.base import Clock
from ..types import TierKind
from .auth import TierAuth
from .base import LOGGER, PutResult, Tier, TierUsage
from .record import BlockRecord, NamespaceMismatchError, RecordError, check_key, parse_record

T = TypeVar("T")
STAGING_BYTES = 8 << 20
"""`put_many` sends at most this many bytes of records per pipeline (one record at least)."""
REDIS_FAILURES = (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError)


def split_cluster_flag(url: str) -> tuple[str, bool]:
    """(url without its `cluster` query parameter, whether that parameter asked for cluster mode)."""
    return parse_redis_url(url)


class _Staging(threading.local):
    """One reused buffer per thread that records are serialised into before they are sent: a fresh buffer per
    value would be paged in (and its pages zeroed) every time, which costs as much as the copy itself. Holds up
    to max(STAGING_BYTES, the largest record) per thread that puts."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def views(self, values: Sequence[Sequence[bytes | memoryview]]) -> list[memoryview]:
        """Views of `values` (each a list of chunks) serialised one after another (valid until the next call)."""
        parts = [[memoryview(c).cast("B") for c in chunks] for chunks in values]
        total = sum(p.nbytes for chunks in parts for p in chunks)
        if len(self.buf) < total:
            self.buf = bytearray(total)
        whole = memoryview(self.buf)
        views, offset = [], 0
        for chunks in parts:
            start = offset
            for part in chunks:
                whole[offset : offset + part.nbytes] = part
                offset += part.nbytes
            views.append(whole[start:offset])
        return views


def _batches(items: list[tuple[bytes, BlockRecord]]) -> Iterator[list[tuple[bytes, BlockRecord]]]:
    """`items` in runs of at most STAGING_BYTES (a bigger record is a run of its own)."""
    batch: list[tuple[bytes, BlockRecord]] = []
    size = 0
    for item in items:
        if batch and size + item[1].nbytes > STAGING_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item[1].nbytes
    if batch:
        yield batch


class RedisTier(Tier):
    """Blocks of one namespace under `prefix` in Redis at `url` (redis://, rediss://, unix://)."""

    kind = TierKind.REDIS
    durable = True

    def __init__(
        self,
        namespace: bytes,
        url: str = "redis://127.0.0.1:6379/0",
        cluster: bool | None = None,
        prefix: str = "uakv:",
        ttl_s: int | None = None,
        retry_interval_s: float = 1.0,
        timeout_s: float = 2.0,
        clock: Clock | None = None,
        name: str | None = None,
        secret: str | bytes | None = None,
        read_timeout_s: float = 0.5,
    ) -> None:
        super().__init__(namespace, name)
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1):
            raise ValueError(f"ttl_s={ttl_s!r} must be a positive integer or None")
        for label, value in (("timeout_s", timeout_s), ("read_timeout_s", read_timeout_s),
                             ("retry_interval_s", retry_interval_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
                raise ValueError(f"{label}={value!r} must be a positive number of seconds")
        self.url, flagged = parse_redis_url(url)
        self.cluster = flagged if cluster is None else bool(cluster)
        self.ttl_s = ttl_s
        self.retry_interval_s = float(retry_interval_s)
        self.timeout_s = float(timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.auth = TierAuth(secret, namespace) if secret is not None else None
        scope = self.auth.scope if self.auth is not None else namespace.hex()
        self._prefix = prefix.encode() + scope.encode() + b":"
        self._clock = clock or time.monotonic
        self._reader: Any = None
        self._writer: Any = None
        self._down = False
        self._retry_at = 0.0
        self._prober: threading.Thread | None = None
        self._last_error = ""
        self._lock = threading.Lock()
        self._staging = _Staging()
        if self.auth is None:
            LOGGER.warning("%s tier: no tier_secret (UAKV_TIER_SECRET) is set: anyone who can write to the redis "
                           "at %s can forge blocks that are served and probe which prompts were sent", self.name,
                           self.url)

    def redis_key(self, key: bytes) -> bytes:
        check_key(key)
        return self._prefix + (self.auth.name(key) if self.auth is not None else key).hex().encode()

    # -- the six methods -------------------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        name = self.redis_key(key)
        return bool(self._call(lambda c: c.exists(name), 0, read=True))

    def get(self, key: bytes) -> BlockRecord | None:
        return self.get_many([key])[0]

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        keys = list(keys)
        names = [self.redis_key(k) for k in keys]
        if not names:
            return []

        def fetch(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            return pipe.execute(raise_on_error=False)  # a WRONGTYPE reply spoils one key, not the lookup

        values = self._call(fetch, [None] * len(keys), read=True)
        return [self._verified(k, v) for k, v in zip(keys, values, strict=True)]

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        return self.put_many([(key, record)])[0]

    def put_many(self, items: Iterable[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        """`put` of each (key, record), in order: one pipeline per STAGING_BYTES of records."""
        items = list(items)
        for key, record in items:
            self._check_put(key, record)
        results: list[PutResult] = []
        for batch in _batches(items):
            results.extend(self._put_batch(batch))
        return results

    def remove(self, key: bytes) -> bool:
        name = self.redis_key(key)
        removed = bool(self._call(lambda c: c.delete(name), 0))
        if removed:
            self.counters.add("removed")
        return removed

    def usage(self) -> TierUsage:
        return TierUsage(
            self.name, self.kind, None, None, None,
            healthy=not self._down, last_error=self._last_error, counters=self._counters(),
        )  # fmt: skip

    def __iter__(self) -> Iterator[bytes]:
        if self.auth is not None:
            raise TypeError(f"tier {self.name!r} stores blocks under secret names and cannot list their hashes")
        pattern = self._prefix + b"*"
        names = self._call(lambda c: list(c.scan_iter(match=pattern, count=1000)), [])
        return iter(bytes.fromhex(n[len(self._prefix) :].decode()) for n in names)

    # -- internals ----------------------------------------------------------------------------------------------

    def _value_chunks(self, record: BlockRecord) -> Sequence[bytes | memoryview]:
        return self.auth.seal(record) if self.auth is not None else record.chunks()

    def _put_batch(self, items: list[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        views = self._staging.views([self._value_chunks(r) for _, r in items])
        values = list(zip([self.redis_key(k) for k, _ in items], views, strict=True))

        def store(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, value in values:
                pipe.set(name, value, ex=self.ttl_s)
            return pipe.execute()

        replies = self._call(store, [None] * len(items))
        results = []
        for (_, value), reply in zip(values, replies, strict=True):
            if reply is True:
                self.counters.add("puts")
                self.counters.add("bytes_in", len(value))
            results.append(PutResult(True) if reply is True else PutResult(False, reason=f"redis: {self._last_error}"))
        return results

    def _verified(self, key: bytes, value: Any) -> BlockRecord | None:
        if value is None:
            self.counters.add("misses")
            return None
        try:
            if not isinstance(value, bytes | bytearray | memoryview):
                raise RecordError(f"value is {type(value).__name__}: {value!s:.80}, not a record")
            if self.auth is not None:
                value = self.auth.open(key, self.namespace, value)
            record = parse_record(value, key, self.namespace)
        except RecordError as exc:
            kind = "namespace_dropped" if isinstance(exc, NamespaceMismatchError) else "corrupt_dropped"
            self.counters.add(kind)
            self.counters.add("misses")
            LOGGER.warning("%s tier: dropping value of block %s: %s", self.name, key.hex()[:16], exc)
            name = self.redis_key(key)
            self._call(lambda c: c.delete(name), 0)
            return None
        self.counters.add("hits")
        self.counters.add("bytes_out", record.nbytes)
        return record

    def _call(self, op: Callable[[Any], T], fallback: T, read: bool = False) -> T:
        """`op(client)`, or `fallback` when the breaker is open or the call fails (counted, logged once per
        outage). Reads use the client with the request-path deadline."""
        client = self._client(read)
        if client is None:
            self.counters.add("unavailable")
            return fallback
        try:
            return op(client)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return fallback

    def _client(self, read: bool) -> Any:
        with self._lock:
            if self._down:
                if self._clock() >= self._retry_at and (self._prober is None or not self._prober.is_alive()):
                    self._retry_at = self._clock() + self.retry_interval_s
                    self._prober = threading.Thread(target=self._probe, name=f"uakv-{self.name}-probe", daemon=True)
                    self._prober.start()
                return None
            if self._reader is None:
                try:
                    self._reader, self._writer = self._connect()
                except REDIS_FAILURES as exc:
                    self._failed_locked(exc)
                    return None
            return self._reader if read else self._writer

    def _probe(self) -> None:
        """Background: one connect + PING; closes the breaker when it answers, else keeps it open."""
        try:
            reader, writer = self._connect()
            reader.ping()
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return
        with self._lock:
            self._reader, self._writer, self._down = reader, writer, False
        self.counters.add("reconnects")
        LOGGER.info("%s tier: redis at %s is reachable again", self.name, self.url)

    def _connect(self) -> tuple[Any, Any]:
        """(reader, writer) clients: reads wait at most read_timeout_s, writes at most timeout_s."""
        def client(timeout: float) -> Any:
            options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                                       "retry": Retry(NoBackoff(), 0)}
            if self.cluster:
                return RedisCluster.from_url(self.url, **options)
            return redis.Redis.from_url(self.url, **options)

        return client(min(self.read_timeout_s, self.timeout_s)), client(self.timeout_s)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._failed_locked(exc)

    def _failed_locked(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self.counters.add("errors")
        self._retry_at = self._clock() + self.retry_interval_s
        for conn in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            try:
                conn.close()
            except REDIS_FAILURES:
                pass
        self._reader = self._writer = None
        if not self._down:
            self._down = True
            LOGGER.warning("%s tier: redis at %s failed (%s); serving misses until it is back", self.name,
                           self.url, self._last_error)
