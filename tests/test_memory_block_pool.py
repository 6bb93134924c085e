"""BlockPool in a tiny world: an 11-block pool of 4-token blocks; exact ids, ref counts and free-list order."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.memory import BlockPool, EvictedBlock, KVSpec

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
H0, H1, H2 = b"\x00" * 32, b"\x01" * 32, b"\x02" * 32


def refs(pool: BlockPool) -> list[int]:
    return [pool.ref_count(b) for b in range(pool.num_blocks)]


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool(SPEC, 11)


def test_fresh_pool(pool: BlockPool):
    assert pool.kv.shape == (11, 2, 2, 4, 2, 4)
    assert pool.free_block_ids() == list(range(11)) and pool.num_free == 11
    assert refs(pool) == [0] * 11
    assert [pool.block_hash(b) for b in range(11)] == [None] * 11


def test_allocate_share_free_in_reverse_and_evict_on_reuse(pool: BlockPool):
    seq_a = pool.allocate_many(3)
    assert seq_a == [0, 1, 2]
    assert pool.allocate_many(2) == [3, 4]
    assert pool.free_block_ids() == [5, 6, 7, 8, 9, 10]
    pool.set_block_hash(0, H0)  # blocks 0 and 1 are full and committed; block 2 is a partial tail
    pool.set_block_hash(1, H1)
    pool.incref(0)  # a second sequence shares the committed prefix
    pool.incref(1)
    assert refs(pool) == [2, 2, 1, 1, 1, 0, 0, 0, 0, 0, 0]

    pool.free(seq_a)
    assert refs(pool) == [1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert pool.free_block_ids() == [2, 5, 6, 7, 8, 9, 10]  # an unnamed block is reused first

    pool.free([0, 1])  # the sharer ends: its tail (1) is queued before its head (0)
    assert pool.free_block_ids() == [2, 5, 6, 7, 8, 9, 10, 1, 0]
    assert pool.block_hash(0) == H0 and pool.block_hash(1) == H1  # cached while free

    assert pool.allocate_many(7) == [2, 5, 6, 7, 8, 9, 10]
    assert pool.take_evicted() == []
    assert pool.allocate() == 1  # reuses the cached tail: its hash leaves
    assert pool.block_hash(1) is None and pool.ref_count(1) == 1
    assert pool.take_evicted() == [EvictedBlock(1, H1)]
    assert pool.take_evicted() == []
    assert pool.num_evictions == 1

    pool.incref(0)  # a prefix hit revives the last cached free block
    assert pool.free_block_ids() == [] and pool.ref_count(0) == 1 and pool.block_hash(0) == H0
    assert pool.allocate() is None
    assert pool.allocate_many(1) is None
    assert pool.allocate_many(0) == []
    assert refs(pool) == [1] * 11


def test_unnamed_blocks_of_a_sequence_return_to_the_head_in_order(pool: BlockPool):
    blocks = pool.allocate_many(4)
    assert blocks == [0, 1, 2, 3]
    pool.set_block_hash(0, H0)
    pool.free(blocks)
    assert pool.free_block_ids() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]


def test_allocate_many_is_all_or_nothing(pool: BlockPool):
    pool.allocate_many(9)
    pool.set_block_hash(8, H2)
    pool.free([8])
    before = (pool.free_block_ids(), refs(pool))
    assert pool.allocate_many(4) is None
    assert (pool.free_block_ids(), refs(pool)) == before
    assert pool.block_hash(8) == H2 and pool.take_evicted() == []


def test_bad_free_leaves_state_intact(pool: BlockPool):
    pool.allocate_many(3)
    pool.incref(1)
    before = (pool.free_block_ids(), refs(pool))
    with pytest.raises(ValueError, match="block 2 has ref count 1; cannot drop 2 reference"):
        pool.free([1, 2, 2])
    with pytest.raises(ValueError, match="block 5 has ref count 0"):
        pool.decref(5)
    with pytest.raises(ValueError, match="block id 11 is out of range"):
        pool.free([0, 11])
    assert (pool.free_block_ids(), refs(pool)) == before


def test_hash_rules(pool: BlockPool):
    with pytest.raises(ValueError, match="block 0 is free; only a held block can be given a hash"):
        pool.set_block_hash(0, H0)
    with pytest.raises(ValueError, match="block 0 is free and holds no cached content"):
        pool.incref(0)
    block = pool.allocate()
    assert block == 0
    pool.set_block_hash(0, H0)
    pool.set_block_hash(0, H0)  # same name again: no change
    with pytest.raises(ValueError, match="block 0 already holds hash"):
        pool.set_block_hash(0, H1)
    with pytest.raises(ValueError, match="block_hash=b'' must be non-empty bytes"):
        pool.set_block_hash(0, b"")
    pool.decref(0)
    assert pool.free_block_ids() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]
    assert pool.clear_block_hash(0) == H0  # a free block that loses its name is reused first
    assert pool.free_block_ids() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert pool.clear_block_hash(0) is None
    assert pool.num_cached() == 0


def test_on_evict_callback_receives_evictions_instead_of_the_list():
    seen: list[EvictedBlock] = []
    pool = BlockPool(SPEC, 2, on_evict=seen.append)
    pool.allocate_many(2)
    pool.set_block_hash(0, H0)
    pool.set_block_hash(1, H1)
    pool.free([0, 1])
    assert pool.free_block_ids() == [1, 0]
    assert pool.allocate_many(2) == [1, 0]
    assert seen == [EvictedBlock(1, H1), EvictedBlock(0, H0)]
    assert pool.take_evicted() == []


def test_copy_block_copies_kv_and_guards_named_or_shared_targets(pool: BlockPool):
    src, dst, shared = pool.allocate_many(3)  # type: ignore[misc]
    pool.block(src).copy_(torch.arange(SPEC.elements_per_block, dtype=torch.float32).view(SPEC.block_shape))
    pool.copy_block(src, dst)
    assert torch.equal(pool.kv[dst], pool.kv[src])
    pool.incref(shared)
    with pytest.raises(ValueError, match="block 2 must be exclusively held and unnamed"):
        pool.copy_block(src, shared)
    pool.set_block_hash(dst, H0)
    with pytest.raises(ValueError, match="block 1 must be exclusively held and unnamed"):
        pool.copy_block(src, dst)


def test_constructor_validation():
    with pytest.raises(ValueError, match="num_blocks=0 must be a positive integer"):
        BlockPool(SPEC, 0)
    with pytest.raises(TypeError, match="spec=.* must be a KVSpec"):
        BlockPool("spec", 3)  # type: ignore[arg-type]


class ReferencePool:
    """The pool's documented semantics with plain lists (O(n)), to check the O(1) pool against."""

    def __init__(self, n: int) -> None:
        self.free = list(range(n))
        self.ref = [0] * n
        self.hash: list[bytes | None] = [None] * n
        self.evicted: list[EvictedBlock] = []

    def allocate_many(self, k: int) -> list[int] | None:
        if k > len(self.free):
            return None
        out, self.free = self.free[:k], self.free[k:]
        for b in out:
            self.ref[b] = 1
            if self.hash[b] is not None:
                self.evicted.append(EvictedBlock(b, self.hash[b]))  # type: ignore[arg-type]
                self.hash[b] = None
        return out

    def free_blocks(self, ids: list[int]) -> None:
        for b in reversed(ids):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.hash[b] is None:
                    self.free.insert(0, b)
                else:
                    self.free.append(b)

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.free.remove(b)
        self.ref[b] += 1


def test_random_operations_match_the_reference_model():
    import random

    rng = random.Random(7)
    pool, ref = BlockPool(SPEC, 11), ReferencePool(11)
    held: list[list[int]] = []
    for step in range(3000):
        op = rng.random()
        if op < 0.4:
            k = rng.randint(0, 5)
            assert pool.allocate_many(k) == (got := ref.allocate_many(k))
            if got:
                held.append(got)
        elif op < 0.7 and held:
            ids = held.pop(rng.randrange(len(held)))
            pool.free(ids)
            ref.free_blocks(ids)
        elif op < 0.85 and held:
            ids = rng.choice(held)
            block = rng.choice(ids)
            if ref.hash[block] is None:
                name = step.to_bytes(32, "little")
                pool.set_block_hash(block, name)
                ref.hash[block] = name
        else:
            cached = [b for b in ref.free if ref.hash[b] is not None]
            if cached:
                block = rng.choice(cached)
                pool.incref(block)
                ref.incref(block)
                held.append([block])
        assert pool.free_block_ids() == ref.free
        assert refs(pool) == ref.ref
        assert [pool.block_hash(b) for b in range(11)] == ref.hash
        assert pool.take_evicted() == ref.evicted
        ref.evicted = []
