"""`UltraAdaptiveKVCacheEngine`: the seed's front object. Thread-safe and safe under `asyncio.gather`.

It owns a cache from the strategy registry (the seed's content-addressed `store`/`retrieve`), and, on first
use of the `process` action, a model session that generates text with prefix reuse through the paged cache.
Requests are dictionaries; each action is one handler in `self._actions` (a registry, not a branch).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import torch

from ..cache.disk_census import count_kv_blocks
from ..cache.factory import create_cache
from ..cache.paged_cache import PagedKVCache
from ..cache.shared_snapshot import SharedSnapshot
from ..config import KVCacheConfig
from ..metrics import LOGGER_NAME, Profiler
from .metrics_collector import AdvancedMetricsCollector
from .optimizer import PerformanceOptimizer
from .requests import RequestError, check_fields, require_dict, require_tensor, require_text, resolve_action
from .stream import StreamChunk

if TYPE_CHECKING:
    from ..cache.manager import KVCacheManager
    from ..model.loaded import LoadedModel
    from ..model.prefix_cache import PrefixCache
    from .session import ModelSession

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
STORE_FIELDS = frozenset({"action", "key", "value"})
RETRIEVE_FIELDS = frozenset({"action", "key"})


def _wants_stream(request: dict[str, Any], action: str) -> bool:
    """The request's "stream" flag (False when absent); RequestError unless a bool on a `process` request."""
    value = request.get("stream", False)
    if not isinstance(value, bool):
        raise RequestError(f"stream={value!r} must be true or false")
    if value and action != "process":
        raise RequestError(f"stream=True applies to the 'process' action only; got action {action!r}")
    return value


class UltraAdaptiveKVCacheEngine:
    """Ultra-adaptive KV cache with advanced features."""

    def __init__(self, config: KVCacheConfig | None = None, model: LoadedModel | None = None) -> None:
        """`model` (optional) is an already loaded model; by default `config.model_path` is loaded on the
        first `process` request (the embedded SmolLM2 when it is None)."""
        if config is None:
            config = KVCacheConfig()
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        self.logger = logging.getLogger(LOGGER_NAME)
        self.cache = create_cache(config)
        self._snapshot = SharedSnapshot(config.persistence_dir, config.tenant_salt)  # touches no disk until used
        self.profiler = Profiler(enabled=config.enable_profiling)
        self._actions: dict[str, Handler] = {
            "store": self._handle_store,
            "retrieve": self._handle_retrieve,
            "process": self._handle_process,
        }
        self._session: ModelSession | None = None
        self._model = model
        self.optimizer = PerformanceOptimizer()
        self._session_lock = threading.Lock()
        self.logger.debug("engine ready: strategy=%s max_tokens=%d", config.cache_strategy, config.max_tokens)

    # ----------------------------------------------------------------- seed's tensor API
    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Cache `value` under the content of `key`."""
        with self.profiler.measure("store"):
            self.cache.store(key, value)

    def retrieve(self, key: torch.Tensor) -> torch.Tensor | None:
        """The value stored under `key`'s content, or None."""
        with self.profiler.measure("retrieve"):
            return self.cache.retrieve(key)

    # ----------------------------------------------------------------- requests
    async def process_request(self, request: dict[str, Any]) -> Any:
        """Run one request: {'action': 'store'|'retrieve'|'process', ...}; its result dict. Raises ValueError on
        bad input. A `process` request with ``"stream": True`` returns the async iterator of `stream(request)`
        (validated before it is returned)."""
        require_dict(request)
        action = resolve_action(request, sorted(self._actions))
        if _wants_stream(request, action):
            self._check_process(request)
            session = await asyncio.to_thread(self._model_session)
            return session.stream(request)
        start = time.perf_counter()
        try:
            return await self._actions[action](request)
        finally:
            self.profiler.record(f"request.{action}", time.perf_counter() - start)

    async def _handle_store(self, request: dict[str, Any]) -> dict[str, Any]:
        check_fields(request, STORE_FIELDS, "store")
        key, value = require_tensor(request, "key"), require_tensor(request, "value")
        self.store(key, value)
        return {"action": "store", "stored": True}

    async def _handle_retrieve(self, request: dict[str, Any]) -> dict[str, Any]:
        check_fields(request, RETRIEVE_FIELDS, "retrieve")
        value = self.retrieve(require_tensor(request, "key"))
        return {"action": "retrieve", "value": value, "cache_hit": value is not None}

    async def _handle_process(self, request: dict[str, Any]) -> dict[str, Any]:
        self._check_process(request)
        session = await asyncio.to_thread(self._model_session)
        return await session.process(request)

    def stream(self, request: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        """The completion of a `process` request as `StreamChunk`s (engine/stream.py states the contract).

        Validates synchronously: a bad request raises `RequestError` here, before iteration (the model is
        loaded now if it was not). Closing the iterator (``aclose()``, or the consumer going away) cancels the
        generation and frees its blocks."""
        require_dict(request)
        action = resolve_action(request, sorted(self._actions))
        if action != "process":
            raise RequestError(f"only the 'process' action streams; got action {action!r}")
        _wants_stream(request, action)
        self._check_process(request)
        return self._model_session().stream(request)

    @staticmethod
    def _check_process(request: dict[str, Any]) -> None:
        if "messages" not in request:
            require_text(request)

    def _model_session(self) -> ModelSession:
        """The model session, created on first use (loads the model)."""
        with self._session_lock:
            if self._session is None:
                from .session import ModelSession  # deferred: importing transformers is slow

                self._session = ModelSession(self.config, profiler=self.profiler, loaded=self._model,
                                             optimizer=self.optimizer)
            return self._session

    def cache_manager(self) -> KVCacheManager:
        """The model session's KV cache manager, for reports through its public methods (the server's cache
        digest: `held_blocks`). Loads the model."""
        return self._model_session().cache

    def paged_cache(self) -> PagedKVCache:
        """The seed's `PagedKVCache` over the model session's KV cache manager: sequence-level access (`lookup`,
        `new_sequence`, `append`, `commit`, `read_layer`, ...) to the same blocks, prefix index and tiers that
        `process` requests fill and reuse. Loads the model."""
        return PagedKVCache.over(self._model_session().cache)

    def hf_cache(self) -> PrefixCache:
        """A transformers cache over the model session's KV cache, for any number of `generate` calls of the
        engine's model (`model=` given here, or `config.model_path`; another model is refused):
        ``model.generate(ids, past_key_values=engine.hf_cache())`` reuses and fills the same prefix cache as
        `process` requests (see `model.prefix_cache` for when written blocks become visible). Loads the model."""
        from ..model.prefix_cache import PrefixCache  # deferred: importing transformers is slow

        session = self._model_session()
        return PrefixCache(session.cache, model=session.loaded.model)

    def advanced_optimization(
        self, cache_entries: list[torch.Tensor], optimization_goal: str = "latency"
    ) -> dict[str, Any]:
        """Optimizes `cache_entries` for "latency", "memory" or "throughput" and measures the improvement in the
        same call: {"optimized_count", "improvement_percentage", "metrics", "entries"} (see
        `PerformanceOptimizer.advanced_optimization`). ValueError for an unknown goal, naming the valid ones."""
        with self.profiler.measure("advanced_optimization"):
            return self.optimizer.advanced_optimization(cache_entries, optimization_goal)

    # ----------------------------------------------------------------- persistence
    def _require_persistence(self) -> None:
        if not self.config.enable_persistence:
            raise RuntimeError(
                "persistence is off; create the engine with KVCacheConfig(enable_persistence=True, "
                "persistence_path=...)"
            )

    def persist(self) -> dict[str, Any]:
        """Makes everything in memory durable: the tensor store's entries (one crash-safe snapshot file) and
        every committed KV block of the model session (written to the disk tier and fsynced). Returns what it
        wrote.

        The snapshot is merged, never replaced: entries that other engines (this process or others) persisted
        to the folder since this one last read or wrote it are first added to this engine's store, which can
        evict through its policy (capacity holds), so no persisted entry is lost (`SharedSnapshot`). The
        folder is locked only during the read and the write. "tensor_merged" counts the entries added."""
        self._require_persistence()
        snap = self._snapshot.persist(self.cache)
        result: dict[str, Any] = {"tensor_entries": snap.entries, "tensor_bytes": snap.nbytes,
                                  "tensor_merged": snap.merged, "kv_blocks": 0, "kv_bytes": 0}
        if self._session is not None:
            flushed = self._session.cache.persist()
            if flushed is not None:
                result.update(kv_blocks=len(flushed.keys), kv_bytes=flushed.nbytes)
        self.logger.info("persisted %s", result)
        return result

    def load(self) -> dict[str, Any]:
        """Warms the tensor store from disk: restores the snapshot's entries that it does not hold (which can
        evict through its policy). It does not load the model: the KV blocks on disk are warm-started when the
        model session opens (its disk tier rebuilds its index from the folder, on the first `process`). A
        snapshot that cannot be trusted is not loaded (logged, counted); nothing already cached is lost.

        Returns {"tensor_entries": entries restored, "snapshots_rejected": 0 or 1, "kv_blocks_on_disk": KV
        blocks in the folder}; the last is the session's count when it is open, else a read-only count of the
        folder's block files, every model and tenant, not yet verified (`disk_census.count_kv_blocks`)."""
        self._require_persistence()
        snap = self._snapshot.load(self.cache)
        restored, rejected = snap.restored, int(snap.rejected)
        session = self._session
        disk_blocks = (session.cache.durable_blocks() if session is not None
                       else count_kv_blocks(self.config.persistence_dir))
        result = {"tensor_entries": restored, "snapshots_rejected": rejected, "kv_blocks_on_disk": disk_blocks}
        self.logger.info("loaded %s", result)
        return result

    def close(self) -> None:
        """Waits for queued tier writes (so other processes sharing the tiers see them) and stops the writer
        threads. The engine must not be used afterwards. Idempotent."""
        session = self._session
        if session is not None:
            session.close()

    def __enter__(self) -> UltraAdaptiveKVCacheEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- introspection
    @property
    def metrics(self) -> AdvancedMetricsCollector | None:
        """The Prometheus collector of the live cache (`exposition()`: its text), once the model session is open
        and unless `enable_metrics` is off."""
        return self._session.controllers.metrics if self._session is not None else None

    def get_stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = {"cache": self.cache.stats()}
        if self._session is not None:
            stats["model"] = self._session.stats()
        return stats

    def describe(self) -> dict[str, Any]:
        """Model, cache configuration and sizes (loads the model)."""
        config = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(self.config).items()}
        return {"config": config, **self._model_session().describe()}

    def get_profiling_data(self) -> dict[str, Any]:
        """Per-operation counts and latency percentiles (ms); requires `enable_profiling=True`."""
        if not self.config.enable_profiling:
            raise RuntimeError("profiling is off; create the engine with KVCacheConfig(enable_profiling=True)")
        return {"enabled": True, "operations": self.profiler.snapshot()}
