"""Tier `resize`: shrinking evicts the tier's own policy victims, in the policy's order, and returns them for
demotion; growing evicts nothing. Exact victim order for lru and fifo over the CPU tier and both disk layouts,
and `ResizableTier` spilling what a shrink evicts into the next tier."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.tier_controls import ResizableTier, record_bytes, tier_controls
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import (
    CPUTier,
    DiskTier,
    SegmentDiskTier,
    Tier,
    TieredStore,
    encode_block,
)

NS = hashlib.sha256(b"resize-tests").digest()
CODEC = make_codec("identity")
R = [encode_block(hashlib.sha256(bytes([i])).digest(), NS, torch.full((4, 8), float(i)), CODEC) for i in range(6)]
K = [r.block_hash for r in R]
SIZE = R[0].nbytes

Factory = Callable[[Path, int, str], Tier]
FACTORIES: dict[str, Factory] = {
    "cpu": lambda root, cap, policy: CPUTier(NS, cap, policy=policy, pin_memory=False),
    "disk": lambda root, cap, policy: DiskTier(NS, root, cap, policy=policy, fsync="never", io_threads=1),
    "segments": lambda root, cap, policy: SegmentDiskTier(NS, root, cap, policy=policy, fsync="never", io_threads=1,
                                                          segment_bytes=4096),
}


def filled(factory: Factory, root: Path, policy: str) -> Tier:
    """Four blocks put in order 0..3, then 0 and 2 read (a use for lru, nothing for fifo)."""
    tier = factory(root, 4 * SIZE, policy)
    for r in R[:4]:
        assert tier.put(r.block_hash, r).stored
    assert tier.get(K[0]) is not None and tier.get(K[2]) is not None
    return tier


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize(
    "policy, victims, kept",
    [("lru", [1, 3], [0, 2]), ("fifo", [0, 1], [2, 3])],
)
def test_shrink_evicts_policy_victims_in_order(tmp_path: Path, kind: str, policy: str, victims: list[int],
                                               kept: list[int]) -> None:
    tier = filled(FACTORIES[kind], tmp_path, policy)
    evicted = tier.resize(2 * SIZE)  # type: ignore[attr-defined]
    assert [r.block_hash for r in evicted] == [K[i] for i in victims]
    assert [r.to_bytes() for r in evicted] == [R[i].to_bytes() for i in victims]  # whole, for demotion
    assert sorted(tier) == sorted(K[i] for i in kept)
    usage = tier.usage()
    assert (usage.capacity_bytes, usage.used_bytes, usage.num_blocks) == (2 * SIZE, 2 * SIZE, 2)
    assert usage.counters["evictions"] == 2
    assert tier.put(K[4], R[4]).stored  # the policy goes on at the new capacity: the next victim leaves
    assert len(tier) == 2 and tier.contains(K[4])  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_grow_evicts_nothing_and_makes_room(tmp_path: Path, kind: str) -> None:
    tier = filled(FACTORIES[kind], tmp_path, "lru")
    assert tier.resize(6 * SIZE) == ()  # type: ignore[attr-defined]
    for r in R[4:]:
        assert tier.put(r.block_hash, r).evicted == ()
    assert sorted(tier) == sorted(K)
    with pytest.raises(ValueError, match="capacity_bytes=0 must be a positive integer"):
        tier.resize(0)  # type: ignore[attr-defined]


def test_shrink_below_one_block_empties_the_tier(tmp_path: Path) -> None:
    tier = filled(FACTORIES["cpu"], tmp_path, "fifo")
    assert [r.block_hash for r in tier.resize(SIZE - 1)] == K[:4]  # type: ignore[attr-defined]
    assert tier.usage().used_bytes == 0 and not tier.put(K[4], R[4]).stored


def test_last_disk_tier_evicts_without_reading_victims(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 4 * SIZE, fsync="never", demote_evicted=False, io_threads=1)
    for r in R[:4]:
        tier.put(r.block_hash, r)
    assert tier.resize(SIZE) == ()
    assert list(tier) == [K[3]] and tier.usage().counters["evictions"] == 3


def test_segment_shrink_compacts_the_segments_it_emptied(tmp_path: Path) -> None:
    tier = SegmentDiskTier(NS, tmp_path, 6 * SIZE, policy="fifo", fsync="never", io_threads=1, segment_bytes=2 * SIZE)
    for r in R:
        tier.put(r.block_hash, r)
    before = tier.stats.ids
    tier.resize(2 * SIZE)
    assert sorted(tier) == sorted(K[4:])
    assert before[0] not in tier.stats.ids  # the oldest segment held only evicted blocks: compacted away
    assert all(tier.get(k) is not None for k in K[4:])


@pytest.mark.parametrize("policy, spilled", [("lru", [1, 3]), ("fifo", [0, 1])])
def test_resizable_tier_spills_the_policy_victims_into_the_next_tier(tmp_path: Path, policy: str,
                                                                     spilled: list[int]) -> None:
    fast = filled(FACTORIES["cpu"], tmp_path, policy)
    slow = DiskTier(NS, tmp_path, 10 * SIZE, fsync="never", io_threads=1)
    control = ResizableTier(fast, spill=slow)
    assert control.resize(2 * SIZE) == 2
    assert sorted(slow) == sorted(K[i] for i in spilled)
    assert all(slow.get(K[i]).to_bytes() == R[i].to_bytes() for i in spilled)  # type: ignore[union-attr]
    assert control.resize(8 * SIZE) == 0 and control.usage().capacity_bytes == 8 * SIZE


def test_tier_controls_of_a_store_spill_down_the_whole_chain(tmp_path: Path) -> None:
    fast = filled(FACTORIES["cpu"], tmp_path, "fifo")  # blocks 0..3
    middle = CPUTier(NS, SIZE, pin_memory=False, name="middle")  # room for one block
    disk = DiskTier(NS, tmp_path, 10 * SIZE, fsync="never", io_threads=1)
    controls = tier_controls(TieredStore([fast, middle, disk]))
    assert [c.name for c in controls] == ["cpu", "middle", "disk"]
    assert controls[-1].spill is None
    assert controls[0].resize(SIZE) == 3  # fifo victims 0, 1, 2: one stays in the middle, the rest go on down
    assert list(fast) == [K[3]] and list(middle) == [K[2]] and sorted(disk) == sorted(K[:2])
    with pytest.raises(TypeError, match="TieredStore"):
        tier_controls(fast)  # type: ignore[arg-type]


def test_record_bytes_is_the_size_a_tier_counts() -> None:
    assert record_bytes(NS, (4, 8), torch.float32, CODEC) == SIZE
    int8 = make_codec("int8")
    assert record_bytes(NS, (4, 8), torch.float32, int8) == encode_block(K[0], NS, torch.randn(4, 8), int8).nbytes
