"""BlockPool in a tiny world: an 11-block pool of 4-token blocks; exact ids, ref counts and free-list order."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
import torch

from ultra_adaptive_kv_cache_engine.memory import BlockPool, EvictedBlock, KVSpec
from ultra_adaptive_kv_cache_engine.policies import EvictionPolicy, LRUPolicy, make_policy

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


# -- with an eviction policy ------------------------------------------------------------------------------
def h(i: int) -> bytes:
    return bytes([i + 1]) * 32


def policy_pool(name: str) -> BlockPool:
    """11 blocks; 0..7 named h(0)..h(7) in order, then hits on 2, 5, 5, 0; block 1 still held (pinned)."""
    pool = BlockPool(SPEC, 11, policy=make_policy(name, capacity=11, clock=lambda: 0.0))
    assert pool.allocate_many(11) == list(range(11))
    for b in range(8):
        pool.set_block_hash(b, h(b))
    pool.free([b for b in range(11) if b != 1])
    for b in (2, 5, 5, 0):
        pool.incref(b)
        pool.decref(b)
    return pool


@pytest.mark.parametrize(
    ("name", "victims", "survivor"),
    [
        ("lru", [3, 4, 6, 7, 2, 5], 0),  # least recent first: 1 (pinned), 3, 4, 6, 7, 2, 5, 0
        ("fifo", [0, 2, 3, 4, 5, 6], 7),  # insertion order; hits change nothing
        ("lfu", [3, 4, 6, 7, 2, 0], 5),  # frequency 1: 1 (pinned), 3, 4, 6, 7; then 2, 0 (2 each); then 5 (3)
    ],
)
def test_policy_picks_the_victims_never_a_held_block_and_only_after_the_unnamed_ones(
    name: str, victims: list[int], survivor: int
):
    pool = policy_pool(name)
    assert pool.num_free == 10 and refs(pool) == [0, 1] + [0] * 9
    assert pool.free_block_ids() == [8, 9, 10, 7, 6, 4, 3, 2, 5, 0]  # unnamed in reuse order, then cached by free time
    assert pool.allocate_many(3) == [8, 9, 10]  # unnamed free blocks first: nothing evicted
    assert pool.take_evicted() == [] and pool.num_evictions == 0
    assert pool.allocate_many(6) == victims
    assert pool.take_evicted() == [EvictedBlock(b, h(b)) for b in victims]
    assert pool.free_block_ids() == [survivor] and pool.num_free == 1
    assert pool.allocate_many(2) is None and pool.take_evicted() == []  # all or nothing
    assert pool.allocate() == survivor and pool.take_evicted() == [EvictedBlock(survivor, h(survivor))]
    assert pool.allocate() is None and pool.num_free == 0
    assert pool.block_hash(1) == h(1) and pool.ref_count(1) == 1  # the held block kept its content
    assert pool.policy is not None and len(pool.policy) == pool.num_cached() == 1 and h(1) in pool.policy


class Recorder(EvictionPolicy):
    """LRU that records the events it hears and refuses to admit one hash."""

    name = "recorder"

    def __init__(self, refuse: bytes = b"") -> None:
        super().__init__(11, lambda: 0.0)
        self.lru = LRUPolicy()
        self.events: list[tuple[str, Hashable]] = []
        self.refuse = refuse

    def on_insert(self, key: Hashable, size: int = 1) -> None:
        self.events.append(("insert", key))
        assert size == 1
        self.lru.on_insert(key, size)

    def on_access(self, key: Hashable) -> None:
        self.events.append(("access", key))
        self.lru.on_access(key)

    def on_remove(self, key: Hashable) -> None:
        self.events.append(("remove", key))
        self.lru.on_remove(key)

    def victims(self, n: int) -> list[Hashable]:
        return self.lru.victims(n)

    def admit(self, key: Hashable, size: int = 1) -> bool:
        return key != self.refuse

    def __len__(self) -> int:
        return len(self.lru)

    def __contains__(self, key: object) -> bool:
        return key in self.lru


def test_the_pool_tells_the_policy_every_event_of_a_named_block():
    policy = Recorder()
    pool = BlockPool(SPEC, 11, policy=policy)
    a, b, c = pool.allocate_many(3)  # type: ignore[misc]
    pool.set_block_hash(a, H0)
    pool.set_block_hash(a, H0)  # the same name again: no event
    pool.set_block_hash(b, H1)
    pool.incref(a)  # shared while held
    pool.incref(c)  # an unnamed block shared: no event
    pool.free([a, b, c, a, c])
    pool.incref(b)  # a prefix hit revives a cached free block
    assert pool.clear_block_hash(b) == H1  # held: it keeps its slot, unnamed
    assert pool.clear_block_hash(a) == H0  # free: its slot is reused first
    assert pool.clear_block_hash(a) is None
    assert policy.events == [("insert", H0), ("insert", H1), ("access", H0), ("access", H1), ("remove", H1),
                             ("remove", H0)]
    assert pool.free_block_ids()[:2] == [a, c] and len(policy) == 0 and pool.num_free == 10


def test_admit_forwards_to_the_policy_and_a_refused_block_stays_unnamed():
    assert BlockPool(SPEC, 2).admit(H0) is True  # no policy: everything is admitted
    policy = Recorder(refuse=H1)
    pool = BlockPool(SPEC, 11, policy=policy)
    blocks = pool.allocate_many(11)
    assert blocks is not None
    for block_id, name in zip(blocks, (H0, H1, H2), strict=False):  # the owner stops at the first refusal
        if not pool.admit(name):
            break
        pool.set_block_hash(block_id, name)
    assert [pool.block_hash(b) for b in range(3)] == [H0, None, None] and policy.events == [("insert", H0)]
    pool.free(blocks)
    assert pool.allocate_many(10) == list(range(1, 11))  # the refused block's slot is reused like any unnamed one
    assert pool.take_evicted() == [] and pool.allocate() == 0 and pool.take_evicted() == [EvictedBlock(0, H0)]


def test_policy_pool_refuses_a_hash_naming_two_blocks_and_a_used_policy():
    pool = BlockPool(SPEC, 11, policy=make_policy("lru", 11))
    pool.allocate_many(2)
    pool.set_block_hash(0, H0)
    with pytest.raises(ValueError, match="already names block 0; one hash, one block"):
        pool.set_block_hash(1, H0)
    assert pool.block_hash(1) is None and len(pool.policy) == 1  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already tracks 1 key"):
        BlockPool(SPEC, 11, policy=pool.policy)
    with pytest.raises(TypeError, match="must be an EvictionPolicy"):
        BlockPool(SPEC, 11, policy="lru")  # type: ignore[arg-type]


class ReferenceLRUPool:
    """The documented semantics with a policy (LRU), with plain lists (O(n))."""

    def __init__(self, n: int) -> None:
        self.unnamed = list(range(n))
        self.ref = [0] * n
        self.hash: list[bytes | None] = [None] * n
        self.lru: list[bytes] = []  # every named block's hash, least recent first
        self.evicted: list[EvictedBlock] = []

    def num_free(self) -> int:
        return len(self.unnamed) + sum(1 for b, x in enumerate(self.hash) if x is not None and self.ref[b] == 0)

    def allocate_many(self, k: int) -> list[int] | None:
        if k > self.num_free():
            return None
        out, self.unnamed = self.unnamed[:k], self.unnamed[k:]
        for name in list(self.lru):
            if len(out) == k:
                break
            block = self.hash.index(name)
            if self.ref[block] == 0:
                self.lru.remove(name)
                self.hash[block] = None
                self.evicted.append(EvictedBlock(block, name))
                out.append(block)
        for b in out:
            self.ref[b] = 1
        return out

    def free_blocks(self, ids: list[int]) -> None:
        for b in reversed(ids):
            self.ref[b] -= 1
            if self.ref[b] == 0 and self.hash[b] is None:
                self.unnamed.insert(0, b)

    def incref(self, b: int) -> None:
        self.ref[b] += 1
        if self.hash[b] is not None:
            self.lru.remove(self.hash[b])  # type: ignore[arg-type]
            self.lru.append(self.hash[b])  # type: ignore[arg-type]


def test_random_operations_with_lru_match_the_reference_model():
    import random

    rng = random.Random(11)
    pool, ref = BlockPool(SPEC, 11, policy=make_policy("lru", 11)), ReferenceLRUPool(11)
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
            block = rng.choice(rng.choice(held))
            if ref.hash[block] is None:
                name = step.to_bytes(32, "little")
                pool.set_block_hash(block, name)
                ref.hash[block] = name
                ref.lru.append(name)
        else:
            named = [b for b in range(11) if ref.hash[b] is not None]
            if named:
                block = rng.choice(named)
                pool.incref(block)
                ref.incref(block)
                held.append([block])
        assert refs(pool) == ref.ref and pool.num_free == ref.num_free()
        assert [pool.block_hash(b) for b in range(11)] == ref.hash
        assert pool.take_evicted() == ref.evicted
        assert pool.policy is not None and list(pool.policy.victims(11)) == ref.lru
        ref.evicted = []
