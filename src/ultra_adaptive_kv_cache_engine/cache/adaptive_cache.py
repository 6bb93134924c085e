"""`AdaptiveKVCache`: the seed's cache that adapts its eviction to the workload (strategy ADAPTIVE)."""

from __future__ import annotations

from ..config import KVCacheConfig
from ..types import CacheStrategy
from .base_cache import BaseKVCache


class AdaptiveKVCache(BaseKVCache):
    """Adaptive cache that adjusts strategy based on workload.

    Its eviction order comes from the policy registered as "adaptive" in the policy registry, which learns
    online between recency and frequency from what it observes (see policies/adaptive.py).
    """

    def __init__(self, config: KVCacheConfig) -> None:
        super().__init__(config)

    def _policy_name(self) -> str:
        return CacheStrategy.ADAPTIVE.value
