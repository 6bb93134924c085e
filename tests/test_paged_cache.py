"""KVCacheManager in a tiny world: 11 blocks of 4 tokens, 2 layers, 2 KV heads, head_dim 3.

KV read back must equal what was appended (torch.equal), across block boundaries and for prefixes ending
mid-block; block ids, ref counts and free-list order are asserted exactly after each step.
"""

from __future__ import annotations

import threading

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, PrefixMatch
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec, OutOfBlocksError
from ultra_adaptive_kv_cache_engine.prefix import Namespace

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=3, block_size=4, dtype=torch.float32)
CONFIG = KVCacheConfig(block_size=4, device="cpu", max_memory=11 * SPEC.bytes_per_block)  # an 11-block pool


def kv(count: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    keys = [torch.randn(2, count, 3, generator=gen) for _ in range(2)]
    values = [torch.randn(2, count, 3, generator=gen) for _ in range(2)]
    return keys, values


def cat(*parts: tuple[list[torch.Tensor], list[torch.Tensor]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    keys = [torch.cat([p[0][layer] for p in parts], dim=1) for layer in range(2)]
    values = [torch.cat([p[1][layer] for p in parts], dim=1) for layer in range(2)]
    return keys, values


def assert_reads(cache: KVCacheManager, seq_id: int, expected: tuple[list[torch.Tensor], list[torch.Tensor]]) -> None:
    for layer in range(2):
        keys, values = cache.read_layer(seq_id, layer)
        assert keys.is_contiguous() and values.is_contiguous()
        assert torch.equal(keys, expected[0][layer])
        assert torch.equal(values, expected[1][layer])


def refs(cache: KVCacheManager) -> list[int]:
    return [cache.pool.ref_count(b) for b in range(cache.pool.num_blocks)]


def snapshot(cache: KVCacheManager, seq_id: int) -> tuple[object, ...]:
    return (cache.block_table(seq_id), cache.sequence_tokens(seq_id), cache.num_kv_tokens(seq_id), refs(cache),
            cache.pool.free_block_ids(), sorted(cache.index), cache.pool.kv.clone())


def same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return a[:-1] == b[:-1] and torch.equal(a[-1], b[-1])  # type: ignore[arg-type]


@pytest.fixture
def cache() -> KVCacheManager:
    return KVCacheManager(CONFIG, SPEC)


def test_defaults(cache: KVCacheManager):
    assert cache.pool.num_blocks == 11 and cache.pool.kv.shape == (11, 2, 2, 4, 2, 3)
    assert cache.namespace.block_size == 4 and cache.namespace.dtype == "float32"
    # The pool is sized by bytes (max_memory), never by max_tokens (the seed tensor store's capacity).
    budget = KVCacheConfig(max_tokens=4, block_size=4, max_memory=12 * SPEC.bytes_per_block + 5)
    assert KVCacheManager(budget, SPEC).pool.num_blocks == 12
    assert KVCacheManager(CONFIG, SPEC, num_blocks=3).pool.num_blocks == 3


def test_round_trip_across_block_boundaries(cache: KVCacheManager):
    seq = cache.new_sequence()
    parts = [kv(3, 1), kv(6, 2), kv(1, 3), kv(0, 4)]
    tokens = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], []]
    for toks, part in zip(tokens, parts, strict=True):
        cache.append(seq, toks, *part)
    assert cache.block_table(seq) == (0, 1, 2)
    assert cache.sequence_tokens(seq) == tuple(range(1, 11)) and cache.num_kv_tokens(seq) == 10
    assert_reads(cache, seq, cat(*parts))


def test_prefix_sharing_reuse_eviction_and_out_of_blocks(cache: KVCacheManager):
    prompt = list(range(100, 110))  # 10 tokens: blocks of 4, 4 and a partial 2
    a = cache.new_sequence(prompt)
    assert cache.num_cached_tokens(a) == 0 and cache.block_table(a) == ()
    kv_a = kv(10, 1)
    cache.append(a, prompt, *kv_a)
    assert cache.block_table(a) == (0, 1, 2)
    assert cache.commit(a) == 2 and cache.commit(a) == 0  # only the two full blocks
    assert [cache.pool.block_hash(b) is not None for b in (0, 1, 2)] == [True, True, False]

    assert cache.lookup(prompt).block_ids == (0, 1)
    assert cache.lookup(prompt[:6]) == PrefixMatch((0,), cache.lookup(prompt).hashes[:1], 4)  # mid-block
    assert cache.lookup([7] + prompt).block_ids == ()
    assert refs(cache) == [1, 1, 1] + [0] * 8  # lookup changes no ref count

    b = cache.new_sequence(prompt[:8] + [50, 51])
    assert cache.num_cached_tokens(b) == 8 and cache.block_table(b) == (0, 1)
    assert refs(cache) == [2, 2, 1] + [0] * 8
    kv_b = kv(2, 2)
    cache.append(b, [50, 51], *kv_b)
    assert cache.block_table(b) == (0, 1, 3)
    first8 = ([k[:, :8] for k in kv_a[0]], [v[:, :8] for v in kv_a[1]])
    assert_reads(cache, b, cat(first8, kv_b))
    match = cache.lookup(prompt)
    for layer in range(2):
        keys, values = cache.read_prefix(match, layer)
        assert torch.equal(keys, first8[0][layer]) and torch.equal(values, first8[1][layer])

    cache.free(a)
    assert refs(cache) == [1, 1, 0, 1] + [0] * 7
    assert cache.pool.free_block_ids() == [2, 4, 5, 6, 7, 8, 9, 10]
    cache.free(b)  # reverse order: unnamed tail 3 to the head, then 1 before 0 at the tail
    assert cache.pool.free_block_ids() == [3, 2, 4, 5, 6, 7, 8, 9, 10, 1, 0]
    assert cache.lookup(prompt).block_ids == (0, 1)  # freed, still cached

    c = cache.new_sequence()
    cache.append(c, list(range(36)), *kv(36, 3))
    assert cache.block_table(c) == (3, 2, 4, 5, 6, 7, 8, 9, 10)
    assert len(cache.index) == 2
    cache.append(c, [36, 37, 38, 39], *kv(4, 4))  # reuses cached block 1: its hash leaves the index
    assert cache.block_table(c)[-1] == 1 and len(cache.index) == 1
    assert cache.lookup(prompt).block_ids == (0,)
    cache.append(c, [40, 41], *kv(2, 5))
    assert cache.block_table(c)[-1] == 0 and len(cache.index) == 0 and cache.pool.num_free == 0
    assert cache.stats()["block_evictions"] == 2

    cache.append(c, [42, 43], *kv(2, 6))  # fits in the partial last block: no new block
    before = snapshot(cache, c)
    with pytest.raises(OutOfBlocksError, match=r"need 1 free block\(s\) of 4 tokens, the pool has 0 of 11 free"):
        cache.append(c, [44], *kv(1, 7))
    assert same(snapshot(cache, c), before)


def test_copy_on_write_after_fork(cache: KVCacheManager):
    a = cache.new_sequence()
    kv_a = kv(6, 1)
    cache.append(a, [1, 2, 3, 4, 5, 6], *kv_a)
    b = cache.fork(a)
    assert cache.block_table(b) == (0, 1) and refs(cache)[:3] == [2, 2, 0]
    assert cache.num_cached_tokens(b) == 6 and cache.sequence_tokens(b) == (1, 2, 3, 4, 5, 6)

    kv_b = kv(1, 2)
    cache.append(b, [7], *kv_b)  # the shared partial block 1 is copied to block 2 before the write
    assert cache.block_table(b) == (0, 2) and cache.block_table(a) == (0, 1)
    assert refs(cache)[:4] == [2, 1, 1, 0]
    assert_reads(cache, a, kv_a)
    assert_reads(cache, b, cat(kv_a, kv_b))

    kv_a2 = kv(3, 3)
    cache.append(a, [70, 80, 90], *kv_a2)  # block 1 is a's alone now: written in place, then block 3
    assert cache.block_table(a) == (0, 1, 3) and refs(cache)[:5] == [2, 1, 1, 1, 0]
    assert_reads(cache, a, cat(kv_a, kv_a2))
    assert_reads(cache, b, cat(kv_a, kv_b))
    assert cache.stats()["copy_on_write_blocks"] == 1

    assert cache.commit(a) == 2  # blocks 0 and 1
    assert cache.commit(b) == 0  # b's first block is block 0, already named; its second is partial
    cache.free(a)
    cache.free(b)
    assert refs(cache) == [0] * 11
    assert cache.pool.free_block_ids() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 0]


def test_fork_of_full_blocks_needs_no_copy(cache: KVCacheManager):
    a = cache.new_sequence()
    cache.append(a, list(range(8)), *kv(8, 1))
    b = cache.fork(a)
    cache.append(b, [8], *kv(1, 2))
    assert cache.block_table(b) == (0, 1, 2) and cache.stats()["copy_on_write_blocks"] == 0


def test_same_content_computed_twice_is_named_once(cache: KVCacheManager):
    a, b = cache.new_sequence(), cache.new_sequence()
    cache.append(a, list(range(8)), *kv(8, 1))
    cache.append(b, list(range(8)), *kv(8, 1))
    assert cache.commit(a) == 2 and cache.commit(b) == 0
    assert cache.lookup(list(range(8))).block_ids == (0, 1)
    assert cache.pool.block_hash(2) is None and cache.pool.block_hash(3) is None
    cache.free(b)
    assert cache.pool.free_block_ids()[:2] == [2, 3]  # unnamed duplicates are reused first


def test_pending_tokens_from_new_sequence(cache: KVCacheManager):
    a = cache.new_sequence(list(range(8)))
    cache.append(a, list(range(8)), *kv(8, 1))
    cache.commit(a)
    prompt = list(range(8)) + [20, 21, 22]
    b = cache.new_sequence(prompt)
    assert cache.num_cached_tokens(b) == 8 and cache.num_kv_tokens(b) == 8
    with pytest.raises(ValueError, match=r"token_ids \[20, 99\] differ from the tokens recorded for sequence 1"):
        cache.append(b, [20, 99], *kv(2, 2))
    cache.append(b, [20, 21], *kv(2, 2))  # chunked prefill of the recorded tokens
    cache.append(b, [22, 23], *kv(2, 3))  # the last recorded token, then a new one
    assert cache.sequence_tokens(b) == tuple(prompt + [23]) and cache.num_kv_tokens(b) == 12


def test_max_cached_tokens_leaves_tokens_to_compute(cache: KVCacheManager):
    a = cache.new_sequence()
    cache.append(a, list(range(8)), *kv(8, 1))
    cache.commit(a)
    assert cache.num_cached_tokens(cache.new_sequence(list(range(8)))) == 8
    assert cache.num_cached_tokens(cache.new_sequence(list(range(8)), max_cached_tokens=7)) == 4
    assert cache.num_cached_tokens(cache.new_sequence(list(range(8)), max_cached_tokens=0)) == 0
    with pytest.raises(ValueError, match="max_cached_tokens=-1"):
        cache.new_sequence([1], max_cached_tokens=-1)
    assert refs(cache)[:2] == [3, 2]


def test_stale_match_is_refused(cache: KVCacheManager):
    a = cache.new_sequence()
    cache.append(a, list(range(4)), *kv(4, 1))
    cache.commit(a)
    match = cache.lookup(list(range(4)))
    cache.free(a)
    c = cache.new_sequence()
    cache.append(c, list(range(50, 94)), *kv(44, 2))  # all 11 blocks: block 0 is reused
    with pytest.raises(ValueError, match="match is stale: block 0"):
        cache.read_prefix(match, 0)


def test_bad_appends_change_nothing(cache: KVCacheManager):
    seq = cache.new_sequence()
    cache.append(seq, [1, 2], *kv(2, 1))
    before = snapshot(cache, seq)
    keys, values = kv(2, 2)
    keys3, values3 = kv(3, 2)
    bad_calls = [
        (ValueError, "keys has 1 layer", lambda: cache.append(seq, [3, 4], keys[:1], values)),
        (ValueError, r"values\[1\] has shape \(2, 2, 3\); expected \(2, 3, 3\)",
         lambda: cache.append(seq, [3, 4, 5], keys3, [values3[0], values[1]])),
        (TypeError, r"keys\[0\] has dtype torch.float16",
         lambda: cache.append(seq, [3, 4], [k.half() for k in keys], values)),
        (TypeError, "keys must be a sequence of one tensor per layer",
         lambda: cache.append(seq, [3, 4], keys[0], values)),
        (ValueError, "NaN or Inf", lambda: cache.append(seq, [3, 4], [keys[0], keys[1] * float("nan")], values)),
        (ValueError, r"token_ids\[1\]='x' must be an integer", lambda: cache.append(seq, [3, "x"], keys, values)),
        (ValueError, "seq_id=7 is not a live sequence", lambda: cache.append(7, [3, 4], keys, values)),
        (ValueError, r"layer=2 is out of range; expected an int in \[0, 2\)", lambda: cache.read_layer(seq, 2)),
    ]
    for error, message, call in bad_calls:
        with pytest.raises(error, match=message):
            call()
        assert same(snapshot(cache, seq), before)


def test_constructor_validation():
    with pytest.raises(ValueError, match="spec.block_size=4 must equal config.block_size=16"):
        KVCacheManager(KVCacheConfig(), SPEC)
    with pytest.raises(ValueError, match="spec.dtype=torch.float32 must equal config.dtype=float16"):
        KVCacheManager(KVCacheConfig(block_size=4, dtype="float16"), SPEC)
    wrong = Namespace("m", "w", "t", "float32", 8, 1)
    with pytest.raises(ValueError, match="namespace.block_size=8 must be 4"):
        KVCacheManager(CONFIG, SPEC, namespace=wrong)


class CustomMemoryAllocator:
    """The seed's example allocator, CPU variant."""

    def allocate(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.float16, device="cpu")

    def deallocate(self, tensor: torch.Tensor) -> None:
        del tensor


def test_users_allocator_and_half_precision():
    spec = KVSpec(2, 2, 3, 4, dtype=torch.float16)
    cache = KVCacheManager(CONFIG, spec, allocator=CustomMemoryAllocator())
    seq = cache.new_sequence()
    keys, values = kv(5, 1)
    half = ([k.half() for k in keys], [v.half() for v in values])
    cache.append(seq, [1, 2, 3, 4, 5], *half)
    assert_reads(cache, seq, half)
    with pytest.raises(ValueError, match="dtype torch.float16; the KV spec expects torch.float32"):
        KVCacheManager(CONFIG, SPEC, allocator=CustomMemoryAllocator())


def test_tenants_do_not_share_blocks():
    base = Namespace("m", "w", "t", "float32", 4, 1)
    caches = [KVCacheManager(CONFIG, SPEC, namespace=base.with_tenant(t)) for t in ("a", "a", "b")]
    for cache in caches[:1]:
        seq = cache.new_sequence()
        cache.append(seq, [1, 2, 3, 4], *kv(4, 1))
        cache.commit(seq)
    hashes = caches[0].lookup([1, 2, 3, 4]).hashes
    for other, expect_same in ((caches[1], True), (caches[2], False)):
        seq = other.new_sequence()
        other.append(seq, [1, 2, 3, 4], *kv(4, 1))
        other.commit(seq)
        assert (other.lookup([1, 2, 3, 4]).hashes == hashes) is expect_same


def test_concurrent_sequences_leave_consistent_state(cache: KVCacheManager):
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for step in range(20):
                seq = cache.new_sequence(list(range(6)))
                done = cache.num_kv_tokens(seq)
                cache.append(seq, list(range(done, 6)), *kv(6 - done, seed * 100 + step))
                cache.commit(seq)
                assert cache.read_layer(seq, 1)[0].shape == (2, 6, 3)
                cache.free(seq)
        except BaseException as exc:  # noqa: BLE001 - reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert refs(cache) == [0] * 11 and cache.pool.num_free == 11
    assert len(cache.index) == 1 and cache.stats()["sequences"] == 0


def test_stats(cache: KVCacheManager):
    seq = cache.new_sequence(list(range(8)))
    cache.append(seq, list(range(8)), *kv(8, 1))
    cache.commit(seq)
    cache.new_sequence(list(range(8)))
    stats = cache.stats()
    assert {k: stats[k] for k in ("num_blocks", "free_blocks", "indexed_blocks", "sequences", "prefix_query_tokens",
                                  "prefix_hit_tokens", "prefix_hit_rate", "committed_blocks")} == {
        "num_blocks": 11, "free_blocks": 9, "indexed_blocks": 2, "sequences": 2, "prefix_query_tokens": 16,
        "prefix_hit_tokens": 8, "prefix_hit_rate": 0.5, "committed_blocks": 2}
    assert (stats["pool_budget"], stats["pool_budget_bytes"]) == ("max_memory", 11 * SPEC.bytes_per_block)


def test_the_seeds_paged_cache_from_a_config_alone():
    # The seed's hierarchy: PagedKVCache is a BaseKVCache (nn.Module) built from a config; its KV is paged.
    from torch import nn

    from ultra_adaptive_kv_cache_engine import BaseKVCache, PagedKVCache

    paged = PagedKVCache(KVCacheConfig(max_tokens=64, block_size=4, max_memory=1 << 20))
    assert isinstance(paged, BaseKVCache) and isinstance(paged, nn.Module)
    spec = paged.spec
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.block_size, spec.dtype) == (1, 8, 64, 4, torch.float32)
    assert paged.manager.num_blocks == (1 << 20) // spec.bytes_per_block == 64  # 16 KiB blocks
    key, value = torch.arange(4.0), torch.ones(2, 3)
    paged.store(key, value)  # the seed's content-addressed store, bounded by max_tokens
    assert torch.equal(paged.retrieve(key), value)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    keys, values = [torch.randn(8, 8, 64, generator=gen)], [torch.randn(8, 8, 64, generator=gen)]
    seq = paged.new_sequence(list(range(8)))
    paged.append(seq, list(range(8)), keys, values)
    assert paged.commit(seq) == 2
    paged.free(seq)
    again = paged.new_sequence(list(range(8)))
    assert paged.num_cached_tokens(again) == 8
    assert torch.equal(paged.read_layer(again, 0)[1], values[0])
    assert paged.stats()["paged"]["prefix_hit_tokens"] == 8 and paged.stats()["entries"] == 1


@pytest.mark.gpu
def test_on_cuda_with_bfloat16_from_device_and_host_tensors():
    spec = KVSpec(2, 2, 3, 4, dtype=torch.bfloat16, device="cuda")
    cache = KVCacheManager(KVCacheConfig(block_size=4, device="cuda"), spec, num_blocks=11)
    assert cache.pool.kv.is_cuda
    seq = cache.new_sequence()
    host = kv(6, 1)
    host = ([k.bfloat16() for k in host[0]], [v.bfloat16() for v in host[1]])
    cache.append(seq, list(range(6)), host[0], host[1])  # host tensors are copied to the pool's device
    extra = kv(3, 2)
    extra = ([k.bfloat16() for k in extra[0]], [v.bfloat16() for v in extra[1]])
    device = ([k.cuda() for k in extra[0]], [v.cuda() for v in extra[1]])
    child = cache.fork(seq)
    cache.append(child, [6, 7, 8], *device)  # copy-on-write of the shared partial block, on the GPU
    assert cache.block_table(child) == (0, 2, 3) and cache.block_table(seq) == (0, 1)
    for layer in range(2):
        keys, values = cache.read_layer(child, layer)
        assert keys.is_cuda
        assert torch.equal(keys.cpu(), torch.cat([host[0][layer], extra[0][layer]], dim=1))
        assert torch.equal(values.cpu(), torch.cat([host[1][layer], extra[1][layer]], dim=1))
        parent_keys, _ = cache.read_layer(seq, layer)
        assert torch.equal(parent_keys.cpu(), host[0][layer])
    assert cache.commit(child) == 2
    match = cache.lookup(list(range(8)))
    assert match.block_ids == (0, 2) and torch.equal(cache.read_prefix(match, 1)[0].cpu(),
                                                     cache.read_layer(child, 1)[0][:, :8].cpu())
