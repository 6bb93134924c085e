"""`ChainMemo`: the names it hands out are exactly `hash_blocks`' ones; a prefix looked up again is not hashed
again (the very same name objects come back); hashing stays lazy and resumes where a lookup stopped; the least
recently used prefix is dropped; the cache manager's lookups of one prompt share one chain."""

from __future__ import annotations

import itertools

import pytest
import torch

from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.prefix import Namespace, hash_blocks
from ultra_adaptive_kv_cache_engine.prefix.chain_memo import ChainMemo

NS = Namespace("m", "w", "t", "float16", 4, 1)
TOKENS = list(range(100, 141))  # 10 full blocks of 4 and one token


def test_names_are_the_chained_hashes_and_a_second_lookup_hashes_nothing():
    memo = ChainMemo(NS)
    first = list(memo.names(TOKENS, 10))
    assert first == hash_blocks(TOKENS, NS, 4)
    again = list(memo.names(TOKENS[:-1], 10))  # another list with the same 10 blocks
    assert again == first and all(a is b for a, b in zip(again, first, strict=True))


def test_hashing_is_lazy_and_resumes_where_a_lookup_stopped():
    memo = ChainMemo(NS)
    assert list(itertools.islice(memo.names(TOKENS, 10), 3)) == hash_blocks(TOKENS, NS, 4)[:3]
    resumed = list(memo.names(TOKENS, 10))
    assert resumed == hash_blocks(TOKENS, NS, 4)
    assert list(memo.names(TOKENS, 4)) == hash_blocks(TOKENS[:16], NS, 4)  # a shorter prefix is its own entry
    assert len(memo) == 2


def test_the_least_recently_used_prefix_is_dropped():
    memo = ChainMemo(NS, entries=2)
    a = list(memo.names(TOKENS, 2))
    list(memo.names([7] * 8, 2))
    assert all(x is y for x, y in zip(memo.names(TOKENS, 2), a, strict=True))  # used again: now the newest
    list(memo.names([9] * 8, 2))  # drops [7] * 8, not TOKENS
    assert all(x is y for x, y in zip(memo.names(TOKENS, 2), a, strict=True)) and len(memo) == 2
    list(memo.names([5] * 8, 2))
    list(memo.names([6] * 8, 2))  # TOKENS is the oldest now and goes
    b = list(memo.names(TOKENS, 2))
    assert b == a and not any(x is y for x, y in zip(b, a, strict=True))


@pytest.mark.parametrize("count", [-1, 11, 2.0, True])
def test_a_count_beyond_the_full_blocks_is_refused(count):
    with pytest.raises(ValueError, match="count"):
        list(ChainMemo(NS).names(TOKENS, count))


def test_bad_entries_are_refused():
    with pytest.raises(ValueError, match="entries"):
        ChainMemo(NS, entries=0)


def test_the_managers_count_then_open_of_one_prompt_share_one_chain():
    spec = KVSpec(num_layers=1, num_kv_heads=1, head_dim=4, block_size=4, dtype=torch.float32, device="cpu")
    config = KVCacheConfig(block_size=4, device="cpu", cpu_tier_bytes=0)
    cache = KVCacheManager(config, spec, 32, default_namespace(config, spec))
    seq = cache.new_sequence(TOKENS)
    kv = [torch.randn(1, len(TOKENS), 4)]
    cache.append(seq, TOKENS, kv, kv)
    cache.commit(seq)
    looked = cache.lookup(TOKENS)
    opened = cache.new_sequence(TOKENS, max_cached_tokens=len(TOKENS) - 1)
    assert looked.num_tokens == 40 and cache.num_cached_tokens(opened) == 40
    assert looked.hashes == tuple(hash_blocks(TOKENS, cache.namespace, 4))
    assert all(a is b for a, b in zip(looked.hashes, cache.lookup(TOKENS[:40]).hashes, strict=True))
