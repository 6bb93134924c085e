"""ultra-adaptive-kv-cache: a KV cache engine for LLM inference.

The public names (the seed's) are importable from here; each is loaded on first use so that importing the
package stays cheap (no transformers import until a model is needed).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

from .metrics import LOGGER_NAME

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())

_EXPORTS: dict[str, str] = {
    "KVCacheConfig": ".config",
    "CacheStrategy": ".types",
    "KVDType": ".types",
    "DeviceKind": ".types",
    "CodecKind": ".types",
    "TierKind": ".types",
    "FsyncPolicy": ".types",
    "OptimizationGoal": ".types",
    "EvictionPolicy": ".policies",
    "register_policy": ".policies",
    "BaseKVCache": ".cache.base_cache",
    "AdaptiveKVCache": ".cache.adaptive_cache",
    "PagedKVCache": ".cache.paged_cache",
    "register_strategy": ".cache.factory",
    "create_cache": ".cache.factory",
    "UltraAdaptiveKVCacheEngine": ".engine.engine",
    "WorkloadPredictor": ".engine.predictor",
    "CachePrefetcher": ".engine.prefetcher",
    "AutoScaler": ".engine.autoscaler",
    "AdvancedMetricsCollector": ".engine.metrics_collector",
    "PerformanceOptimizer": ".engine.optimizer",
    "AdvancedCompressor": ".compression.compressor",
    "KVSpec": ".memory.kv_spec",
    "BlockPool": ".memory.block_pool",
    "OutOfBlocksError": ".memory.block_pool",
    "TorchAllocator": ".memory.allocator",
    "plan_num_blocks": ".memory.planner",
    "Namespace": ".prefix.namespace",
    "PrefixMatch": ".cache.paged_cache",
}

__all__ = sorted(_EXPORTS) + ["LOGGER_NAME", "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
