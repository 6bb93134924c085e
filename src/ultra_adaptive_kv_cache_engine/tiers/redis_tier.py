"""`RedisTier`: blocks in a shared Redis or Valkey, single node or Redis Cluster, through one class.

Keys are `<prefix><namespace hex>:<block hash hex>`; values are the serialised records, verified on every read
(checksum, block hash, namespace). A value that fails is never served: it is counted and deleted. Records are
serialised into a reused per-thread buffer before they are sent (no fresh allocation per value).

Cluster mode is chosen by `cluster=True` or by `?cluster=true` in the URL (removed before the URL reaches
redis-py); the client is then `redis.cluster.RedisCluster`, which follows slots and MOVED redirections itself.

Failure contract: no Redis error ever reaches the caller. A failed call counts in `errors`, is logged once per
outage (warning; an info line when Redis is back), and returns a miss / `PutResult(stored=False)`. During the
next `retry_interval_s` seconds calls are skipped at once (`unavailable` counts them) instead of waiting on a
timeout each; then the tier tries again, reconnecting by itself. Capacity is Redis's own business
(`maxmemory` and its eviction policy; optional `ttl_s` per key): `usage()` reports None for sizes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from ..policies.base import Clock
from ..types import TierKind
from .base import LOGGER, PutResult, Tier, TierUsage
from .record import BlockRecord, NamespaceMismatchError, RecordError, check_key, parse_record

T = TypeVar("T")
STAGING_BYTES = 8 << 20
"""`put_many` sends at most this many bytes of records per pipeline (one record at least)."""
_TRUE = {"1", "true", "yes", "on"}
REDIS_FAILURES = (redis.exceptions.RedisError, OSError)


def split_cluster_flag(url: str) -> tuple[str, bool]:
    """(url without its `cluster` query parameter, whether that parameter asked for cluster mode)."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    flags = [v for k, v in query if k == "cluster"]
    rest = [(k, v) for k, v in query if k != "cluster"]
    return urlunsplit(parts._replace(query=urlencode(rest))), any(v.lower() in _TRUE for v in flags)


class _Staging(threading.local):
    """One reused buffer per thread that records are serialised into before they are sent: a fresh buffer per
    value would be paged in (and its pages zeroed) every time, which costs as much as the copy itself. Holds up
    to max(STAGING_BYTES, the largest record) per thread that puts."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def views(self, records: list[BlockRecord]) -> list[memoryview]:
        """Views of `records` serialised one after another into the buffer (valid until the next call)."""
        total = sum(r.nbytes for r in records)
        if len(self.buf) < total:
            self.buf = bytearray(total)
        whole = memoryview(self.buf)
        views, offset = [], 0
        for record in records:
            start = offset
            for chunk in record.chunks():
                part = memoryview(chunk).cast("B")
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
    ) -> None:
        super().__init__(namespace, name)
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"url={url!r} must start with redis://, rediss:// or unix://")
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1):
            raise ValueError(f"ttl_s={ttl_s!r} must be a positive integer or None")
        self.url, flagged = split_cluster_flag(url)
        self.cluster = flagged if cluster is None else bool(cluster)
        self.ttl_s = ttl_s
        self.retry_interval_s = float(retry_interval_s)
        self.timeout_s = float(timeout_s)
        self._prefix = prefix.encode() + namespace.hex().encode() + b":"
        self._clock = clock or time.monotonic
        self._conn: Any = None
        self._down = False
        self._retry_at = 0.0
        self._last_error = ""
        self._lock = threading.Lock()
        self._staging = _Staging()

    def redis_key(self, key: bytes) -> bytes:
        return self._prefix + check_key(key).hex().encode()

    # -- the six methods -------------------------------------------------------------------------------------

    def contains(self, key: bytes) -> bool:
        name = self.redis_key(key)
        return bool(self._call(lambda c: c.exists(name), 0))

    def get(self, key: bytes) -> BlockRecord | None:
        name = self.redis_key(key)
        return self._verified(key, self._call(lambda c: c.get(name), None))

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        keys = list(keys)
        names = [self.redis_key(k) for k in keys]
        if not names:
            return []

        def fetch(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name in names:
                pipe.get(name)
            return pipe.execute()

        values = self._call(fetch, [None] * len(keys))
        return [self._verified(k, v) for k, v in zip(keys, values, strict=True)]

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        self._check_put(key, record)
        name, value = self.redis_key(key), self._staging.views([record])[0]
        ok = self._call(lambda c: c.set(name, value, ex=self.ttl_s), None)
        if not ok:
            return PutResult(False, reason=f"redis unavailable: {self._last_error}")
        self.counters.add("puts")
        self.counters.add("bytes_in", len(value))
        return PutResult(True)

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
        pattern = self._prefix + b"*"
        names = self._call(lambda c: list(c.scan_iter(match=pattern, count=1000)), [])
        return iter(bytes.fromhex(n[len(self._prefix) :].decode()) for n in names)

    # -- internals ----------------------------------------------------------------------------------------------

    def _put_batch(self, items: list[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        values = list(zip([self.redis_key(k) for k, _ in items], self._staging.views([r for _, r in items]),
                          strict=True))

        def store(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, value in values:
                pipe.set(name, value, ex=self.ttl_s)
            return pipe.execute()

        replies = self._call(store, [None] * len(items))
        results = []
        for (_, value), reply in zip(values, replies, strict=True):
            if reply:
                self.counters.add("puts")
                self.counters.add("bytes_in", len(value))
            results.append(PutResult(True) if reply else PutResult(False, reason=f"redis: {self._last_error}"))
        return results

    def _verified(self, key: bytes, value: Any) -> BlockRecord | None:
        if value is None:
            self.counters.add("misses")
            return None
        try:
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

    def _call(self, op: Callable[[Any], T], fallback: T) -> T:
        """`op(client)`, or `fallback` when Redis is unreachable or fails (counted, logged once per outage)."""
        client = self._client()
        if client is None:
            self.counters.add("unavailable")
            return fallback
        try:
            result = op(client)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return fallback
        if self._down:
            self._down = False
            self.counters.add("reconnects")
            LOGGER.info("%s tier: redis at %s is reachable again", self.name, self.url)
        return result

    def _client(self) -> Any:
        with self._lock:
            if self._conn is not None and not (self._down and self._clock() < self._retry_at):
                return self._conn
            if self._clock() < self._retry_at:
                return None
            try:
                self._conn = self._connect()
            except REDIS_FAILURES as exc:
                self._conn = None
                self._failed_locked(exc)
                return None
            return self._conn

    def _connect(self) -> Any:
        options: dict[str, Any] = {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
            "retry": Retry(NoBackoff(), 1),
        }
        if self.cluster:
            return RedisCluster.from_url(self.url, **options)
        return redis.Redis.from_url(self.url, **options)

    def _failed(self, exc: BaseException) -> None:
        with self._lock:
            self._failed_locked(exc)

    def _failed_locked(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        self.counters.add("errors")
        self._retry_at = self._clock() + self.retry_interval_s
        if self.cluster and self._conn is not None:  # rebuild the slot map from scratch next time
            try:
                self._conn.close()
            except REDIS_FAILURES:
                pass
            self._conn = None
        if not self._down:
            self._down = True
            LOGGER.warning("%s tier: redis at %s failed (%s); serving misses until it is back", self.name,
                           self.url, self._last_error)
