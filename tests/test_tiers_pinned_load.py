"""Promotion from a pinning CPU tier: payload aliases, the direct-or-decode decision, and (gpu) the direct copies.

CPU: `BlockRecord.payload_tensor` aliases the payload (no copy); nothing is page-locked without CUDA, so
`pinned_payload` is None and `load_records` decodes every record (and says so); `copy_host_blocks` validates
everything before it writes. GPU (marked): a pinning CPU tier page-locks identity payloads only; `load_records`
DMAs those straight into their slots and decodes the rest, and the pool equals the blocks exactly, also after
work queued on the current stream that writes the same slots; the same through a paged cache's promotion.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.kernels.transfer import copy_host_blocks
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.tiers import BlockRecord, CPUTier, TieredStore, encode_block, parse_record
from ultra_adaptive_kv_cache_engine.tiers.block_io import LoadResult, load_records, pinned_payload

NS = hashlib.sha256(b"pinned-load-tests").digest()
BLOCK = (2, 2, 4, 3, 8)  # layers, K/V, block_size, kv_heads, head_dim
IDENTITY, INT8 = make_codec("identity"), make_codec("int8")
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def key(i: int) -> bytes:
    return hashlib.sha256(b"p" + bytes([i])).digest()


def blocks(n: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *BLOCK, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_payload_tensor_aliases_the_payload() -> None:
    record = encode_block(key(0), NS, blocks(1)[0], IDENTITY)
    data = bytearray(record.to_bytes())
    parsed = parse_record(memoryview(data), key(0), NS)
    view = parsed.payload_tensor()
    assert view.dtype == torch.uint8 and view.shape == (2 * 2 * 4 * 3 * 8 * 4,)
    assert bytes(view.numpy()) == bytes(record.payload)
    offset = len(parsed.header)
    data[offset] ^= 0xFF  # the view IS the parsed payload's memory
    assert int(view[0]) == data[offset] and parsed.payload_tensor().data_ptr() == view.data_ptr()


def test_nothing_is_pinned_without_cuda_so_every_record_is_decoded() -> None:
    if torch.cuda.is_available():
        pytest.skip("on CUDA a pinning tier's payloads are page-locked (the gpu tests cover it)")
    source = blocks(3)
    records = [encode_block(key(0), NS, source[0], IDENTITY), encode_block(key(1), NS, source[1], INT8),
               encode_block(key(2), NS, source[2], IDENTITY)]
    tier = CPUTier(NS, 1 << 20, pin_memory=None)
    assert not tier.pin_memory
    for r in records:
        tier.put(r.block_hash, r)
    held = [tier.get(r.block_hash) for r in records]
    assert held == records  # kept as they are: no copy
    assert [pinned_payload(r) for r in held] == [None, None, None]  # type: ignore[arg-type]
    pool = torch.zeros(5, *BLOCK)
    assert load_records(pool, [4, 0, 2], held) == LoadResult(direct=0, decoded=3)  # type: ignore[arg-type]
    assert torch.equal(pool[4], source[0]) and torch.equal(pool[2], source[2])
    assert torch.equal(pool[0], records[1].tensor()) and float(pool[[1, 3]].abs().sum()) == 0


def test_lower_tiers_load_says_how_the_blocks_moved() -> None:
    source = blocks(2)
    records = [encode_block(key(i), NS, source[i], IDENTITY) for i in range(2)]
    pool = torch.zeros(3, *BLOCK)
    lower = LowerTiers(TieredStore([CPUTier(NS, 1 << 20, pin_memory=False)]), IDENTITY)
    assert lower.load(pool, [1, 2], records) == LoadResult(direct=0, decoded=2)
    assert torch.equal(pool[1:], source)
    lower.close()


def test_copy_host_blocks_checks_everything_before_it_writes() -> None:
    pool = blocks(4, seed=1)
    fresh = blocks(2, seed=2)
    expected = pool.clone()
    expected[[3, 0]] = fresh
    raw = [fresh[0].reshape(-1).view(torch.uint8).clone(), fresh[1].clone()]
    copy_host_blocks(pool, raw, [3, 0])
    assert torch.equal(pool, expected)
    with pytest.raises(ValueError, match="pool must be a contiguous tensor"):
        copy_host_blocks(pool.transpose(0, 1), raw, [3, 0])
    with pytest.raises(ValueError, match="2 host blocks for 3 block ids"):
        copy_host_blocks(pool, raw, [3, 0, 1])
    with pytest.raises(ValueError, match=r"block ids \[-1\] are out of range for a pool of 4 blocks"):
        copy_host_blocks(pool, raw, [1, -1])
    with pytest.raises(ValueError, match=r"blocks\[0\] must be a contiguous CPU tensor"):
        copy_host_blocks(pool, [fresh[0].transpose(0, 1), raw[1]], [1, 2])
    with pytest.raises(ValueError, match=r"blocks\[1\] holds 8 bytes; a block is 1536"):
        copy_host_blocks(pool, [raw[0], torch.zeros(2)], [1, 2])
    assert torch.equal(pool, expected)  # nothing written by a rejected call


# -- on CUDA -------------------------------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def pinning_tier(records: Sequence[BlockRecord]) -> list[BlockRecord]:
    """What a pinning CPU tier hands back for `records` after holding them."""
    tier = CPUTier(NS, 1 << 22, pin_memory=True)
    for r in records:
        assert tier.put(r.block_hash, r).stored
    return [tier.get(r.block_hash) for r in records]  # type: ignore[misc]


@pytest.mark.gpu
@needs_cuda
def test_pinned_identity_payloads_go_straight_into_their_slots() -> None:
    source = blocks(4, torch.bfloat16, seed=3)
    records = [encode_block(key(i), NS, source[i], INT8 if i == 2 else IDENTITY) for i in range(4)]
    held = pinning_tier(records)
    assert [pinned_payload(r) is not None for r in held] == [True, True, False, True]  # int8 stays pageable
    assert held[2] is records[2] and all(h.checksum == r.checksum for h, r in zip(held, records, strict=True))
    pool = torch.full((6, *BLOCK), 5.0, dtype=torch.bfloat16, device="cuda")
    expected = pool.clone()
    expected[[1, 4, 0, 5]] = torch.stack([source[0], source[1], records[2].tensor(), source[3]]).cuda()
    assert load_records(pool, [1, 4, 0, 5], held) == LoadResult(direct=3, decoded=1)
    assert torch.equal(pool, expected)


@pytest.mark.gpu
@needs_cuda
def test_direct_copies_land_after_work_queued_on_the_current_stream() -> None:
    source = blocks(3, torch.bfloat16, seed=6)
    held = pinning_tier([encode_block(key(i), NS, source[i], IDENTITY) for i in range(3)])
    pool = torch.zeros((4, *BLOCK), dtype=torch.bfloat16, device="cuda")
    slots = torch.tensor([3, 1, 2], device="cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # a slow kernel, then a write into the same slots, on the current stream:
    pool.index_fill_(0, slots, 7.0)  # the copies must land after them, not before
    assert load_records(pool, [3, 1, 2], held) == LoadResult(direct=3, decoded=0)
    assert torch.equal(pool[[3, 1, 2]].cpu(), source) and float(pool[0].abs().sum()) == 0


@pytest.mark.gpu
@needs_cuda
def test_copy_host_blocks_without_waiting_orders_the_current_stream() -> None:
    fresh = blocks(2, seed=4).pin_memory()
    pool = torch.zeros(3, *BLOCK, device="cuda")
    copy_host_blocks(pool, [fresh[0], fresh[1]], [2, 0], wait=False)
    total = pool.sum(dtype=torch.float64)  # queued on the current stream: after the copies
    torch.cuda.current_stream().synchronize()
    assert torch.equal(pool[[2, 0]].cpu(), fresh) and float(total) == float(fresh.sum(dtype=torch.float64))


class RecordingTiers(LowerTiers):
    """The cache's lower tiers, remembering how each promotion moved its blocks."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.results: list[LoadResult] = []

    def load(self, pool_kv: torch.Tensor, block_ids: Sequence[int], records: Sequence[BlockRecord]) -> LoadResult:  # type: ignore[override]
        result = super().load(pool_kv, block_ids, records)
        self.results.append(result)
        return result


@pytest.mark.gpu
@needs_cuda
def test_a_paged_cache_promotes_pinned_blocks_exactly() -> None:
    spec = KVSpec(2, 2, 8, 4, dtype=torch.bfloat16, device="cuda")
    config = KVCacheConfig(block_size=4, device="cuda")
    digest = KVCacheManager(config, spec, num_blocks=11).namespace.digest
    lower = RecordingTiers(TieredStore([CPUTier(digest, 1 << 22, pin_memory=True)]), IDENTITY)
    cache = KVCacheManager(config, spec, num_blocks=11, lower=lower)
    gen = torch.Generator().manual_seed(5)
    keys = [torch.randn(2, 10, 8, generator=gen).bfloat16() for _ in range(2)]
    values = [torch.randn(2, 10, 8, generator=gen).bfloat16() for _ in range(2)]
    tokens = list(range(100, 110))
    seq = cache.new_sequence(tokens)
    cache.append(seq, tokens, keys, values)
    assert cache.commit(seq) == 2
    before = cache.pool.kv[list(cache.block_table(seq)[:2])].clone()
    cache.free(seq)
    cache.persist()
    with cache._lock:  # evict every cached block from the pool
        cache.pool.free(cache.pool.allocate_many(cache.pool.num_free))
    again = cache.new_sequence(tokens)
    assert cache.num_cached_tokens(again) == 8 and lower.results == [LoadResult(direct=2, decoded=0)]
    assert torch.equal(cache.pool.kv[list(cache.block_table(again))], before)
    lower.close()
