"""BaseKVCache, strategy registry and the seed's extension patterns, in tiny worlds with exact state."""

from __future__ import annotations

import threading

import pytest
import torch

from ultra_adaptive_kv_cache_engine import (
    BaseKVCache,
    CacheStrategy,
    KVCacheConfig,
    create_cache,
    register_strategy,
)
from ultra_adaptive_kv_cache_engine.cache.keys import entry_tokens, tensor_digest
from ultra_adaptive_kv_cache_engine.policies.lru import LRUPolicy


@pytest.fixture(autouse=True)
def restore_registries():
    """Strategies registered by a test leave the policy and cache registries as they were."""
    from ultra_adaptive_kv_cache_engine.cache.factory import CACHE_CLASSES
    from ultra_adaptive_kv_cache_engine.policies import POLICIES

    policies, caches = dict(POLICIES), dict(CACHE_CLASSES)
    yield
    POLICIES.clear()
    POLICIES.update(policies)
    CACHE_CLASSES.clear()
    CACHE_CLASSES.update(caches)


def kv(seed: int, tokens: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 4, generator=g)


def lru_cache(max_tokens: int = 6) -> BaseKVCache:
    return create_cache(KVCacheConfig(max_tokens=max_tokens, cache_strategy=CacheStrategy.LRU))


def test_store_retrieve_round_trip_and_copies():
    cache = lru_cache()
    key, value = kv(1), kv(2)
    cache.store(key, value)
    got = cache.retrieve(key)
    assert torch.equal(got, value)
    got.zero_()  # the caller's copy; the cache keeps its own
    value.zero_()
    assert torch.equal(cache.retrieve(key), kv(2))
    assert cache.retrieve(kv(99)) is None
    assert cache.stats() | {} == {
        "strategy": "lru", "entries": 1, "tokens": 2, "max_tokens": 6, "hits": 2, "misses": 1,
        "hit_rate": 2 / 3, "stores": 1, "evictions": 0,
    }


def test_key_names_content_dtype_and_shape():
    a = torch.arange(8, dtype=torch.float32)
    assert tensor_digest(a) == tensor_digest(a.clone())
    assert tensor_digest(a) != tensor_digest(a.to(torch.float64))
    assert tensor_digest(a) != tensor_digest(a.reshape(2, 4))
    assert tensor_digest(torch.ones(3, dtype=torch.bfloat16)) != tensor_digest(torch.ones(3, dtype=torch.float16))
    assert len(tensor_digest(a)) == 32
    assert entry_tokens(torch.zeros(1, 8, 64)) == 8 and entry_tokens(torch.zeros(5)) == 1


def test_lru_eviction_exact_order():
    cache = lru_cache(max_tokens=6)  # three 2-token entries fit
    keys = [kv(10 + i) for i in range(4)]
    for i in range(3):
        cache.store(keys[i], kv(20 + i))
    assert cache.retrieve(keys[0]) is not None  # 0 becomes most recent: order 1, 2, 0
    cache.store(keys[3], kv(23))  # evicts 1
    assert [cache.contains(k) for k in keys] == [True, False, True, True]
    assert cache.num_tokens == 6 and len(cache) == 3
    assert cache.evict(3) == 4  # evicts 2 then 0
    assert [cache.contains(k) for k in keys] == [False, False, False, True]
    assert cache.stats()["evictions"] == 3


def test_overwrite_same_key_keeps_token_count():
    cache = lru_cache(max_tokens=4)
    key = kv(1)
    cache.store(key, kv(2, tokens=2))
    cache.store(key, kv(3, tokens=4))
    assert len(cache) == 1 and cache.num_tokens == 4
    assert torch.equal(cache.retrieve(key), kv(3, tokens=4))


@pytest.mark.parametrize(
    ("key", "value", "error", "match"),
    [
        ("k", torch.ones(1, 2, 4), TypeError, "key must be a torch.Tensor, got str"),
        (torch.ones(2), [1.0], TypeError, "value must be a torch.Tensor, got list"),
        (torch.ones(2), torch.ones(0, 4), ValueError, "empty"),
        (torch.ones(2), torch.tensor([[1.0, float("nan")]]), ValueError, "NaN or Inf"),
        (torch.ones(2), torch.ones(1, 7, 4), ValueError, "larger than the whole capacity max_tokens=6"),
    ],
)
def test_bad_input_leaves_cache_intact(key, value, error, match):
    cache = lru_cache()
    cache.store(kv(1), kv(2))
    with pytest.raises(error, match=match):
        cache.store(key, value)
    assert len(cache) == 1 and cache.num_tokens == 2 and torch.equal(cache.retrieve(kv(1)), kv(2))


def test_non_finite_allowed_when_configured():
    cache = create_cache(KVCacheConfig(max_tokens=8, cache_strategy="lru", reject_non_finite=False))
    cache.store(kv(1), torch.tensor([[float("inf")]]))
    assert torch.isinf(cache.retrieve(kv(1))).all()


def test_evict_rejects_negative():
    with pytest.raises(ValueError, match="num_tokens=-1"):
        lru_cache().evict(-1)


def test_thread_safety_under_many_threads():
    cache = lru_cache(max_tokens=64)
    keys = [kv(i, tokens=1) for i in range(400)]

    def work(lo: int) -> None:
        for k in keys[lo : lo + 100]:
            cache.store(k, k * 2)
            cache.retrieve(k)

    threads = [threading.Thread(target=work, args=(i * 100,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 64 and cache.num_tokens == 64 and len(cache.policy) == 64
    assert cache.stats()["stores"] == 400


def test_register_strategy_by_name_and_select_in_config():
    class MRUPolicy(LRUPolicy):
        name = "mru_test"

        def victims(self, n):
            return list(reversed(self._order))[:n]

    member = register_strategy("mru_test", policy=MRUPolicy)
    assert member is CacheStrategy.MRU_TEST and CacheStrategy("mru_test") is member
    cache = create_cache(KVCacheConfig(max_tokens=4, cache_strategy="mru_test"))
    a, b, c = kv(1), kv(2), kv(3)
    cache.store(a, a)
    cache.store(b, b)
    cache.store(c, c)  # evicts the most recent: b
    assert [cache.contains(x) for x in (a, b, c)] == [True, False, True]


def test_seed_custom_strategy_pattern():
    class CustomKVCache(BaseKVCache):
        def __init__(self, config: KVCacheConfig):
            super().__init__(config)
            self.stored: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.evicted: list[int] = []

        def _evict(self, num_tokens: int) -> None:
            self.evicted.append(num_tokens)

        def _store(self, key: torch.Tensor, value: torch.Tensor) -> None:
            self.stored.append((key, value))

    CacheStrategy.CUSTOM = "custom"

    def create_custom_cache(config):
        if config.cache_strategy == CacheStrategy.CUSTOM:
            return CustomKVCache(config)

    cache = create_custom_cache(KVCacheConfig(max_tokens=16, cache_strategy=CacheStrategy.CUSTOM))
    assert isinstance(cache, CustomKVCache) and cache.policy is None
    cache.store(kv(1), kv(2))
    assert len(cache.stored) == 1 and cache.evicted == []


def test_unregistered_strategy_has_a_clear_error():
    CacheStrategy.NOTHING_HERE = "nothing_here"
    with pytest.raises(ValueError, match="register_strategy\\('nothing_here'"):
        create_cache(KVCacheConfig(cache_strategy="nothing_here"))
    with pytest.raises(ValueError, match="cache_strategy='bogus' is not a known strategy"):
        KVCacheConfig(cache_strategy="bogus")


# ----------------------------------------------------------------------------------------- the seed's patterns
def test_the_seed_assignment_twice_and_after_register_strategy_is_a_no_op():
    CacheStrategy.CUSTOM = "custom"
    CacheStrategy.CUSTOM = "custom"  # a second module doing the seed's line
    assert register_strategy("custom", cache=BaseKVCache) is CacheStrategy.CUSTOM
    assert register_strategy("custom", cache=BaseKVCache) is CacheStrategy.CUSTOM  # registering twice
    CacheStrategy.CUSTOM = "custom"  # the seed's line after register_strategy
    CacheStrategy.LRU = CacheStrategy.LRU
    assert CacheStrategy("custom") is CacheStrategy.CUSTOM and list(CacheStrategy).count(CacheStrategy.CUSTOM) == 1
    with pytest.raises(AttributeError, match="CacheStrategy.CUSTOM is already 'custom'; cannot reassign it to 'other'"):
        CacheStrategy.CUSTOM = "other"
    with pytest.raises(AttributeError, match="CacheStrategy.LRU is already 'lru'; cannot reassign it to 'fifo'"):
        CacheStrategy.LRU = CacheStrategy.FIFO
    assert CacheStrategy.CUSTOM.value == "custom" and CacheStrategy.LRU.value == "lru"


class SideEffectCache(BaseKVCache):
    """The seed's subclass shape: `_store` and `_evict` overridden, neither calling the base's books."""

    def __init__(self, config: KVCacheConfig):
        super().__init__(config)
        self.stored: list[bytes] = []
        self.evicted: list[int] = []

    def _store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.stored.append(self._digest_of(key))

    def _evict(self, num_tokens: int) -> None:
        self.evicted.append(num_tokens)
        super()._evict(num_tokens)


def test_a_subclass_store_hook_keeps_retrieve_capacity_and_the_policy():
    cache = SideEffectCache(KVCacheConfig(max_tokens=6, cache_strategy="lru"))
    keys = [kv(10 + i) for i in range(4)]
    for i in range(3):
        cache.store(keys[i], kv(20 + i))
    assert cache.evicted == [] and torch.equal(cache.retrieve(keys[0]), kv(20))  # order now 1, 2, 0
    cache.store(keys[3], kv(23, tokens=4))  # 6 held + 4 - 6: _evict(4), the policy drops 1 then 2
    assert cache.evicted == [4] and [cache.contains(k) for k in keys] == [True, False, False, True]
    assert cache.stored == [tensor_digest(k) for k in keys] and cache.num_tokens == 6 and len(cache.policy) == 2
    assert cache.stats()["evictions"] == 2 and torch.equal(cache.retrieve(keys[3]), kv(23, tokens=4))


class NewestFirstCache(BaseKVCache):
    """A subclass choosing its own victims (newest first) without any registered policy."""

    def _evict(self, num_tokens: int) -> None:
        freed = 0
        while freed < num_tokens and self._entries:
            freed += self._remove(next(reversed(self._entries)))


def test_a_subclass_evict_chooses_its_own_victims_with_remove():
    CacheStrategy.NEWEST_TEST = "newest_test"
    cache = NewestFirstCache(KVCacheConfig(max_tokens=6, cache_strategy="newest_test"))
    assert cache.policy is None
    keys = [kv(30 + i) for i in range(4)]
    for i, k in enumerate(keys):
        cache.store(k, kv(40 + i))
    assert [cache.contains(k) for k in keys] == [True, True, False, True] and cache.num_tokens == 6


class NeverEvictsCache(BaseKVCache):
    def __init__(self, config: KVCacheConfig):
        super().__init__(config)
        self.stored: list[torch.Tensor] = []

    def _evict(self, num_tokens: int) -> None:
        pass

    def _store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.stored.append(key)


def test_a_subclass_evict_that_frees_too_little_refuses_the_store_and_names_the_shortfall():
    cache = NeverEvictsCache(KVCacheConfig(max_tokens=4, cache_strategy="lru"))
    cache.store(kv(1), kv(2))
    cache.store(kv(3), kv(4))
    with pytest.raises(RuntimeError, match=r"NeverEvictsCache._evict\(2\) left 2 token\(s\) too few for an entry "
                                           r"of 2 within max_tokens=4"):
        cache.store(kv(5), kv(6))
    assert len(cache.stored) == 2 and len(cache) == 2 and cache.num_tokens == 4 and not cache.contains(kv(5))
    cache.store(kv(1), kv(7))  # replacing an entry of the same size needs no room
    assert torch.equal(cache.retrieve(kv(1)), kv(7))


class HalfPrecisionCache(BaseKVCache):
    """A subclass that keeps its own (float16) copy and serves from it through `_retrieve`."""

    def __init__(self, config: KVCacheConfig):
        super().__init__(config)
        self.own: dict[bytes, torch.Tensor] = {}

    def _store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        self.own[self._digest_of(key)] = value.to(torch.float16)

    def _retrieve(self, key: torch.Tensor) -> torch.Tensor | None:
        return self.own[self._digest_of(key)].to(torch.float32)


def test_a_subclass_storing_elsewhere_serves_through_retrieve_and_the_books_gate_membership():
    cache = HalfPrecisionCache(KVCacheConfig(max_tokens=4, cache_strategy="lru"))
    cache.store(kv(1), kv(2))
    cache.store(kv(3), kv(4))
    cache.store(kv(5), kv(6))  # LRU evicts kv(1) from the books; its own copy stays, but is never asked for
    assert torch.equal(cache.retrieve(kv(3)), kv(4).half().float())
    assert cache.retrieve(kv(1)) is None and len(cache.own) == 3
    assert {k: cache.stats()[k] for k in ("hits", "misses", "evictions")} == {"hits": 1, "misses": 1, "evictions": 1}


def test_the_seed_factory_function_through_register_strategy_and_the_engine():
    from ultra_adaptive_kv_cache_engine import UltraAdaptiveKVCacheEngine

    CacheStrategy.CUSTOM = "custom"

    def create_custom_cache(config):
        if config.cache_strategy == CacheStrategy.CUSTOM:
            return SideEffectCache(config)

    assert register_strategy("custom", policy=LRUPolicy, cache=create_custom_cache) is CacheStrategy.CUSTOM
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4, cache_strategy=CacheStrategy.CUSTOM))
    assert type(engine.cache) is SideEffectCache
    for i in range(3):
        engine.store(kv(i), kv(10 + i))
    assert engine.cache.evicted == [2] and engine.retrieve(kv(0)) is None
    assert torch.equal(engine.retrieve(kv(2)), kv(12))


def test_a_factory_that_returns_no_cache_is_a_clear_error():
    register_strategy("nothing_made", cache=lambda config: None)
    with pytest.raises(TypeError, match=r"cache_strategy='nothing_made' \(<lambda>\) returned NoneType; expected "
                                        "a BaseKVCache"):
        create_cache(KVCacheConfig(cache_strategy="nothing_made"))
