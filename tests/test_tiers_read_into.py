"""Reads that land where the block is needed: the disk tier's read straight into a tensor (every fault still
caught), `load_blocks` into pool slots, a store's `get_many_into`, and borrowed records in a write queue."""

from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers import (
    AsyncTransfer,
    CPUTier,
    DiskTier,
    TieredStore,
    borrow_block,
    encode_block,
    load_blocks,
)
from ultra_adaptive_kv_cache_engine.tiers import disk_files as files
from ultra_adaptive_kv_cache_engine.tiers.record import (
    CHECKSUM_BYTES,
    PAYLOAD_ALIGN,
    PREFIX_BYTES,
    raw_header,
)

NS = hashlib.sha256(b"read-into-tests").digest()
OTHER = hashlib.sha256(b"someone-else").digest()
SHAPE = (2, 4, 8)


def key(i: int) -> bytes:
    return hashlib.sha256(b"k" + bytes([i])).digest()


def block(i: int) -> torch.Tensor:
    return (torch.arange(64, dtype=torch.float32).reshape(SHAPE) + 100 * i).to(torch.bfloat16)


def path_of(root: Path, k: bytes, namespace: bytes = NS) -> Path:
    return root / namespace.hex() / k.hex()[:2] / (k.hex() + ".blk")


def test_the_payload_starts_aligned_and_the_header_is_known_in_advance() -> None:
    for shape in [(1,), (3, 5), SHAPE, (16, 2, 16, 8, 128)]:
        out = torch.zeros(shape, dtype=torch.bfloat16)
        record = borrow_block(key(0), NS, out)
        assert len(record.header) % PAYLOAD_ALIGN == 0 and len(record.header) >= PREFIX_BYTES
        assert record.header[PREFIX_BYTES:] == raw_header(out)  # what a reader into `out` expects


def test_read_record_into_accepts_exactly_the_expected_record(tmp_path: Path) -> None:
    record = borrow_block(key(1), NS, block(1))
    good = record.to_bytes()
    path = str(tmp_path / "one.blk")
    out = torch.zeros(SHAPE, dtype=torch.bfloat16)
    view = memoryview(out.view(torch.uint8).numpy()).cast("B")
    Path(path).write_bytes(good)
    assert files.read_record_into(path, record.header, view) and torch.equal(out, block(1))
    for bad in (good[:-1], good + b"\0", good[:50]):
        Path(path).write_bytes(bad)
        assert not files.read_record_into(path, record.header, view)
    Path(path).write_bytes(good)
    other_ns = borrow_block(key(1), OTHER, block(1)).header
    assert not files.read_record_into(path, other_ns, view)  # the expected head names the namespace


def test_every_flipped_byte_of_a_file_is_caught_by_get_into(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 1 << 20)
    record = borrow_block(key(2), NS, block(2))
    size = record.nbytes
    assert size == 192 + 128 + CHECKSUM_BYTES
    out = torch.zeros(SHAPE, dtype=torch.bfloat16)
    for position in range(size):
        assert tier.put(key(2), record).stored
        path = path_of(tmp_path, key(2))
        data = bytearray(path.read_bytes())
        data[position] ^= 0x01
        path.write_bytes(bytes(data))
        assert tier.get_into(key(2), out) is False, position
        assert not path.exists() and not tier.contains(key(2))
    counters = tier.usage().counters
    assert (counters["corrupt_dropped"], counters["misses"], counters["hits"]) == (size, size, 0)
    assert tier.put(key(2), record).stored and tier.get_into(key(2), out) and torch.equal(out, block(2))


def test_get_into_drops_other_tenants_and_decodes_other_codecs(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 1 << 20)
    tier.put(key(3), borrow_block(key(3), NS, block(3)))
    path_of(tmp_path, key(3)).write_bytes(borrow_block(key(3), OTHER, block(3)).to_bytes())  # planted
    out = torch.zeros(SHAPE, dtype=torch.bfloat16)
    assert tier.get_into(key(3), out) is False and tier.usage().counters["namespace_dropped"] == 1
    int8 = encode_block(key(4), NS, block(4), make_codec("int8"))
    tier.put(key(4), int8)
    assert tier.get_into(key(4), out) and torch.equal(out, int8.tensor())


def test_a_version_1_file_is_dropped_at_start_with_its_reason(tmp_path: Path, caplog) -> None:
    DiskTier(NS, tmp_path, 1 << 20).put_many([(key(i), borrow_block(key(i), NS, block(i))) for i in range(2)])
    path = path_of(tmp_path, key(1))
    data = bytearray(path.read_bytes())
    data[8:10] = struct.pack("<H", 1)
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="ultra_adaptive_kv_cache_engine.tiers"):
        tier = DiskTier(NS, tmp_path, 1 << 20)
    assert list(tier) == [key(0)] and tier.usage().counters["corrupt_dropped"] == 1 and not path.exists()
    assert "dropped 1 unreadable block file(s)" in caplog.text and "format version 1" in caplog.text


def test_load_blocks_lands_blocks_in_their_pool_slots(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 1 << 20)
    for i in range(3):
        tier.put(key(i), borrow_block(key(i), NS, block(i)))
    pool = torch.zeros(5, *SHAPE, dtype=torch.bfloat16)
    assert load_blocks(tier, [key(2), key(9), key(0)], pool, [3, 1, 0]) == [True, False, True]
    assert torch.equal(pool[3], block(2)) and torch.equal(pool[0], block(0))
    assert float(pool[[2, 4]].abs().sum()) == 0
    with pytest.raises(ValueError, match="repeat a slot"):
        load_blocks(tier, [key(0), key(1)], pool, [2, 2])
    with pytest.raises(ValueError, match="out of range"):
        load_blocks(tier, [key(0)], pool, [5])
    with pytest.raises(ValueError, match="2 keys for 1 block ids"):
        load_blocks(tier, [key(0), key(1)], pool, [0])
    with pytest.raises(ValueError, match="out is torch.float32"):
        load_blocks(tier, [key(1)], torch.zeros(2, *SHAPE), [0])


@pytest.mark.parametrize("promote", [False, True])
def test_a_store_reads_into_tensors_from_any_tier(tmp_path: Path, promote: bool) -> None:
    top, disk = CPUTier(NS, 1 << 20, pin_memory=False), DiskTier(NS, tmp_path, 1 << 20)
    top.put(key(0), borrow_block(key(0), NS, block(0)))
    disk.put(key(1), borrow_block(key(1), NS, block(1)))
    store = TieredStore([top, disk], promote=promote)
    outs = [torch.zeros(SHAPE, dtype=torch.bfloat16) for _ in range(3)]
    assert store.get_many_into([key(1), key(0), key(7)], outs) == [True, True, False]
    assert torch.equal(outs[0], block(1)) and torch.equal(outs[1], block(0))
    assert (store.counters.get("hits"), store.counters.get("misses")) == (2, 1)
    assert sorted(top) == sorted([key(0), key(1)] if promote else [key(0)])


def test_a_write_queue_copies_a_borrowed_record_at_once(tmp_path: Path) -> None:
    tensor = block(5).clone()
    disk = DiskTier(NS, tmp_path, 1 << 20)
    with AsyncTransfer(disk) as transfer:
        assert transfer.put(key(5), borrow_block(key(5), NS, tensor))
        tensor.zero_()  # the pool slot is reused before the background write runs
    out = torch.zeros(SHAPE, dtype=torch.bfloat16)
    assert disk.get_into(key(5), out) and torch.equal(out, block(5))


def test_borrow_block_copies_what_it_cannot_borrow() -> None:
    strided = block(6).permute(2, 1, 0)  # not contiguous: encoded with one copy
    record = borrow_block(key(6), NS, strided)
    assert not record.borrowed and torch.equal(record.tensor(), strided)
    owned = borrow_block(key(7), NS, block(7)).owned()
    assert not owned.borrowed and isinstance(owned.payload, bytes) and torch.equal(owned.tensor(), block(7))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_blocks_into_a_cuda_pool_through_pinned_staging(tmp_path: Path) -> None:
    tier = DiskTier(NS, tmp_path, 1 << 20)
    for i in range(3):
        tier.put(key(i), borrow_block(key(i), NS, block(i)))
    pool = torch.zeros(4, *SHAPE, dtype=torch.bfloat16, device="cuda")
    assert load_blocks(tier, [key(1), key(8), key(2)], pool, [0, 1, 3]) == [True, False, True]
    assert torch.equal(pool[0].cpu(), block(1)) and torch.equal(pool[3].cpu(), block(2))
    assert float(pool[[1, 2]].abs().sum()) == 0
    assert load_blocks(tier, [key(0)], pool, [2]) == [True] and torch.equal(pool[2].cpu(), block(0))
