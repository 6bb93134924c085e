"""ultra-adaptive-kv-cache: a KV cache engine for LLM inference.

The public names (the seed's) are importable from here; each is loaded on first use so that importing the
package stays cheap (no transformers import until a model is needed).
"""

from __future__ import annotations

import logging

from .lazy import lazy_exports
from .metrics import LOGGER_NAME

__version__ = "0.1.0"

logging.getLogger(LOGGER_NAME).addHandler(logging.NullHandler())

_EXPORTS: dict[str, str] = {
    "KVCacheConfig": ".config",
    "CacheStrategy": ".types",
    "KVDType": ".types",
    "DeviceKind": ".types",
    "CodecKind": ".types",
    "TierKind": ".types",
    "FsyncPolicy": ".types",
    "TierWrites": ".types",
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
    "PrefixMatch": ".cache.manager",
    "KVCacheManager": ".cache.manager",
    "TierConfig": ".config",
    "DiskLayout": ".types",
    "load_model": ".model.loader",
    "LoadedModel": ".model.loaded",
    "generate_with_prefix_cache": ".model.generation",
    "GenerationResult": ".model.generation",
    "PagedHFCache": ".model.hf_cache",
    "PrefixCache": ".model.prefix_cache",
    "ReuseReport": ".model.prefix_cache",
    "build_tiny_llama": ".model.tiny",
    "TinyLlamaSpec": ".model.tiny",
    "TieredStore": ".tiers.store",
    "CPUTier": ".tiers.cpu",
    "DiskTier": ".tiers.disk",
    "RedisTier": ".tiers.redis_tier",
}

__all__ = sorted(_EXPORTS) + ["LOGGER_NAME", "__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
