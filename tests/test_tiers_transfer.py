"""AsyncTransfer (bounded queue, backpressure, batched block writes, prefetch) and batched block copies."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import (
    AsyncTransfer,
    CPUTier,
    DiskTier,
    TieredStore,
    encode_block,
    load_records,
    records_to_host,
)

NS = hashlib.sha256(b"transfer-tests").digest()
BLOCK = (2, 2, 4, 3, 8)  # layers, K/V, block_size, kv_heads, head_dim
IDENTITY = make_codec("identity")


def key(i: int) -> bytes:
    return hashlib.sha256(b"t" + bytes([i])).digest()


def rec(i: int):
    return encode_block(key(i), NS, torch.full(BLOCK, float(i)), IDENTITY)


class GatedTier(CPUTier):
    """A CPU tier whose puts wait for a gate: holds the single writer thread so the queue fills up."""

    def __init__(self) -> None:
        super().__init__(NS, 1 << 20, pin_memory=False)
        self.gate, self.entered = threading.Event(), threading.Event()

    def put(self, k, record):
        self.entered.set()
        assert self.gate.wait(30)
        return super().put(k, record)


def test_a_full_queue_blocks_or_says_so() -> None:
    tier = GatedTier()
    with AsyncTransfer(tier, max_pending=2, workers=1) as transfer:
        assert transfer.put(key(0), rec(0))
        assert tier.entered.wait(30)  # the writer holds block 0; the queue is empty again
        assert transfer.put(key(1), rec(1)) and transfer.put(key(2), rec(2))
        assert transfer.put(key(3), rec(3), block=False) is False
        assert transfer.put(key(3), rec(3), timeout=0.01) is False
        assert transfer.pending == 3 and transfer.counters.get("queue_full") == 2
        tier.gate.set()
        transfer.flush()
        assert transfer.pending == 0 and sorted(tier) == sorted(key(i) for i in range(3))
        assert transfer.counters.snapshot() == {"queued": 3, "queue_full": 2, "written": 3}


def test_put_blocks_copies_so_the_pool_is_free_at_once() -> None:
    pool = torch.randn(6, *BLOCK, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    original = pool.clone()
    tier = CPUTier(NS, 1 << 20, pin_memory=False)
    with AsyncTransfer(tier, workers=2) as transfer:
        assert transfer.put_blocks([key(4)], pool[4:5], IDENTITY) == 1
        assert transfer.put_blocks([key(1), key(2)], pool[1:3], IDENTITY) == 2  # views into the pool
        pool.zero_()  # the cache reuses the evicted slots immediately
        transfer.flush()
    for block_id in (4, 1, 2):
        assert torch.equal(tier.get(key(block_id)).tensor(), original[block_id])


def test_raw_blocks_given_away_are_copied_once_by_a_tier_that_keeps_them() -> None:
    pool = torch.randn(4, *BLOCK, generator=torch.Generator().manual_seed(2))
    given = pool[[1, 2]]  # a fresh host tensor (a gather), given away: its rows are borrowed, not copied here
    tier = CPUTier(NS, 1 << 20, pin_memory=False)
    with AsyncTransfer(tier) as transfer:
        assert transfer.put_blocks([key(1), key(2)], given, IDENTITY, copy=False) == 2
        assert transfer.put_blocks([key(3)], pool[3:4], IDENTITY) == 1  # copied: a block of its own, adopted
        transfer.flush()
    given.zero_()  # had the tier kept views of the batch, these records would change now
    pool.zero_()
    stored = [tier.get(key(i)) for i in (1, 2, 3)]
    assert not any(r.borrowed for r in stored)
    expected = torch.randn(4, *BLOCK, generator=torch.Generator().manual_seed(2))
    for i, record in zip((1, 2, 3), stored, strict=True):
        assert record.meta.codec.value == "identity" and torch.equal(record.tensor(), expected[i])


def test_worker_errors_are_counted_and_the_worker_survives(caplog) -> None:
    tier = CPUTier(NS, 1 << 20, pin_memory=False)
    with AsyncTransfer(tier) as transfer:
        ints = torch.zeros(2, 3, dtype=torch.int64)
        transfer.put_blocks([key(0)], ints[1:], make_codec("int8"))  # int8 refuses integer blocks
        transfer.flush()
        assert transfer.put(key(5), rec(5))
        transfer.flush()
    assert transfer.counters.get("errors") == 1 and list(tier) == [key(5)]
    assert "background write failed" in caplog.text


def test_prefetch_promotes_into_the_fastest_tier(tmp_path: Path) -> None:
    top, disk = CPUTier(NS, 1 << 20, pin_memory=False), DiskTier(NS, tmp_path, 1 << 20)
    for i in range(3):
        disk.put(key(i), rec(i))
    with AsyncTransfer(TieredStore([top, disk])) as transfer:
        assert transfer.prefetch([key(0), key(2), key(9)]).result(timeout=30) == 2
    assert sorted(top) == sorted([key(0), key(2)])


def test_close_is_idempotent_and_final() -> None:
    transfer = AsyncTransfer(CPUTier(NS, 1 << 20, pin_memory=False))
    transfer.put(key(0), rec(0))
    assert transfer.close().keys == () and transfer.close().keys == ()
    with pytest.raises(RuntimeError, match="closed"):
        transfer.put(key(1), rec(1))
    with pytest.raises(ValueError, match="max_pending"):
        AsyncTransfer(CPUTier(NS, 10, pin_memory=False), max_pending=0)


def test_put_blocks_checks_the_batch() -> None:
    with AsyncTransfer(CPUTier(NS, 1 << 20, pin_memory=False)) as transfer:
        with pytest.raises(ValueError, match="2 keys for a batch"):
            transfer.put_blocks([key(0), key(1)], torch.zeros(3, 4), IDENTITY)


@pytest.mark.parametrize("codec", ["identity", "int8"])
def test_load_records_decodes_into_pool_slots(codec: str) -> None:
    blocks = torch.randn(2, *BLOCK, generator=torch.Generator().manual_seed(1))
    records = [encode_block(key(i), NS, blocks[i], make_codec(codec)) for i in range(2)]
    pool = torch.zeros(4, *BLOCK)
    load_records(pool, [2, 0], records)
    assert torch.equal(pool[2], records[0].tensor()) and torch.equal(pool[0], records[1].tensor())
    assert float(pool[[1, 3]].abs().sum()) == 0
    with pytest.raises(ValueError, match="the pool holds"):
        load_records(torch.zeros(4, 2, 2), [0], records[:1])
    with pytest.raises(ValueError, match="records for"):
        load_records(pool, [0, 1], records[:1])
    with pytest.raises(ValueError, match="out of range"):
        load_records(pool, [4], records[:1])
    host = records_to_host(records, BLOCK, torch.float32)
    assert torch.equal(host, torch.stack([r.tensor() for r in records]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_through_pinned_staging() -> None:
    pool = torch.randn(8, *BLOCK, device="cuda").to(torch.bfloat16)
    host = pool[[5, 2, 7]].cpu()
    tier = CPUTier(NS, 1 << 20)  # pins by default on CUDA
    assert tier.pin_memory
    records = [encode_block(key(i), NS, host[i], IDENTITY) for i in range(3)]
    for r in records:
        tier.put(r.block_hash, r)
    target = torch.zeros_like(pool)
    stored = [tier.get(r.block_hash) for r in records]
    assert all(torch.frombuffer(s.payload, dtype=torch.uint8).is_pinned() for s in stored)
    load_records(target, [0, 1, 2], stored)
    assert torch.equal(target[:3], pool[[5, 2, 7]])
    original = pool.clone()
    with AsyncTransfer(tier) as transfer:  # device blocks: device-to-host copies, then background writes
        assert transfer.put_blocks([key(10), key(11)], pool[[0, 1]], IDENTITY) == 2
        assert transfer.put_blocks([key(12)], pool[3:4], IDENTITY) == 1  # a view of the pool
        pool.zero_()  # the next step reuses the slots at once, on the same stream: the copies came first
        given = original[[4, 6]]  # a fresh gather given away: copied on a side stream after the gather
        assert transfer.put_blocks([key(14), key(16)], given, IDENTITY, copy=False) == 2
        del given
        torch.empty_like(original).fill_(7.0)  # may not take the gather's memory before the copy has read it
    for k, block_id in ((11, 1), (12, 3), (14, 4), (16, 6)):
        stored = tier.get(key(k))
        assert not stored.borrowed and stored.payload_tensor().is_pinned()  # the DMA's buffer, kept as it is
        assert torch.equal(stored.tensor().cuda(), original[block_id])
