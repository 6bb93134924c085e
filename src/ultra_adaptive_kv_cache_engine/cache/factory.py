"""Strategy registry: strategy name -> cache class, and `register_strategy` for users' own strategies."""

from __future__ import annotations

from collections.abc import Callable

from ..config import KVCacheConfig
from ..policies import EvictionPolicy, has_policy, register_policy
from ..types import CacheStrategy
from .adaptive_cache import AdaptiveKVCache
from .base_cache import BaseKVCache

CacheFactory = Callable[[KVCacheConfig], BaseKVCache]

CACHE_CLASSES: dict[str, CacheFactory] = {
    CacheStrategy.LRU.value: BaseKVCache,
    CacheStrategy.LFU.value: BaseKVCache,
    CacheStrategy.FIFO.value: BaseKVCache,
    CacheStrategy.S3FIFO.value: BaseKVCache,
    CacheStrategy.ARC.value: BaseKVCache,
    CacheStrategy.ADAPTIVE.value: AdaptiveKVCache,
}


def register_strategy(
    name: str,
    policy: type[EvictionPolicy] | None = None,
    cache: CacheFactory | None = None,
) -> CacheStrategy:
    """Add a strategy: a `CacheStrategy` member `name.upper()` with value `name.lower()`, its eviction policy
    and/or its cache class (or factory). Returns the member, usable in `KVCacheConfig(cache_strategy=...)`.

    The member may exist already (the seed's ``CacheStrategy.CUSTOM = "custom"`` first, or a second call):
    it is reused. `cache` is a `BaseKVCache` subclass or the seed's factory function (config -> cache), which
    `create_cache` (and so the engine) calls for every config naming this strategy.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"strategy name {name!r} must be an identifier such as 'my_policy'")
    if policy is None and cache is None:
        raise ValueError(f"register_strategy({name!r}) needs a policy class, a cache class, or both")
    value = name.lower()
    setattr(CacheStrategy, name.upper(), value)
    if policy is not None:
        register_policy(value, policy)
    if cache is not None:
        if not callable(cache):
            raise ValueError(f"cache={cache!r} must be a BaseKVCache subclass or a callable taking a config")
        CACHE_CLASSES[value] = cache
    return CacheStrategy(value)


def create_cache(config: KVCacheConfig) -> BaseKVCache:
    """The cache for `config.cache_strategy`: its registered class, else BaseKVCache over its policy."""
    value = config.cache_strategy.value
    factory = CACHE_CLASSES.get(value)
    if factory is None and has_policy(value):
        factory = BaseKVCache
    if factory is None:
        known = sorted(set(CACHE_CLASSES) | {s.value for s in CacheStrategy if has_policy(s.value)})
        raise ValueError(
            f"cache_strategy={value!r} has neither a cache class nor a policy registered; "
            f"register it with register_strategy({value!r}, policy=..., cache=...); registered: {', '.join(known)}"
        )
    cache = factory(config)
    if not isinstance(cache, BaseKVCache):
        raise TypeError(
            f"the cache factory registered for cache_strategy={value!r} ({getattr(factory, '__name__', factory)}) "
            f"returned {type(cache).__name__}; expected a BaseKVCache"
        )
    return cache
