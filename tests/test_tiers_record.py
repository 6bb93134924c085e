"""The stored block format: exact layout, and every way a stored block can be wrong is detected and named."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
import xxhash

from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.tiers.record import (
    CHECKSUM_BYTES,
    PREFIX_BYTES,
    CorruptBlockError,
    NamespaceMismatchError,
    UnsupportedFormatError,
    check_key,
    encode_block,
    parse_prefix,
    parse_record,
    seal,
)

NS = hashlib.sha256(b"namespace-a").digest()
OTHER_NS = hashlib.sha256(b"namespace-b").digest()
KEY = hashlib.sha256(b"block-0").digest()


def _record(dtype: torch.dtype = torch.bfloat16, codec: str = "identity"):
    block = torch.arange(2 * 2 * 4 * 3 * 8, dtype=torch.float32).reshape(2, 2, 4, 3, 8).to(dtype) / 7
    return block, encode_block(KEY, NS, block, make_codec(codec))


def test_layout_is_prefix_json_payload_checksum() -> None:
    block, record = _record()
    data = record.to_bytes()
    header_json = json.dumps(
        {"codec": "identity", "dtype": "bfloat16", "params": {}, "shape": [2, 2, 4, 3, 8]},
        separators=(",", ":"), sort_keys=True,
    ).encode()
    header_json += b" " * (-(PREFIX_BYTES + len(header_json)) % 64)  # the payload starts 64-byte aligned
    assert len(header_json) == 104 and (PREFIX_BYTES + len(header_json)) % 64 == 0
    payload = block.view(torch.uint8).numpy().tobytes()
    assert data[:8] == b"UAKVBLK\0"
    assert struct.unpack_from("<HHI", data, 8) == (2, 0, len(header_json))
    assert data[16:48] == KEY and data[48:80] == NS
    assert struct.unpack_from("<Q", data, 80) == (len(payload),)
    assert data[PREFIX_BYTES : PREFIX_BYTES + len(header_json)] == header_json
    assert data[PREFIX_BYTES + len(header_json) : -CHECKSUM_BYTES] == payload
    assert CHECKSUM_BYTES == 16 and data[-CHECKSUM_BYTES:] == xxhash.xxh3_128_digest(data[:-CHECKSUM_BYTES])
    assert record.nbytes == len(data) == PREFIX_BYTES + len(header_json) + len(payload) + CHECKSUM_BYTES


@pytest.mark.parametrize("codec", ["identity", "int8", "fp8", "int4"])
def test_the_header_is_the_canonical_json_of_the_meta(codec: str) -> None:
    record = _record(torch.float16, codec)[1]
    canonical = json.dumps(record.meta.as_json(), separators=(",", ":"), sort_keys=True).encode()
    header = record.header[PREFIX_BYTES:]
    assert header.rstrip(b" ") == canonical and len(record.header) % 64 == 0
    assert json.loads(header) == record.meta.as_json()


@pytest.mark.parametrize("codec", ["identity", "int8", "fp8", "int4"])
def test_parse_round_trip(codec: str) -> None:
    block, record = _record(torch.float16, codec)
    parsed = parse_record(record.to_bytes(), KEY, NS)
    assert (parsed.block_hash, parsed.namespace, parsed.meta, parsed.checksum) == (
        KEY, NS, record.meta, record.checksum)
    assert bytes(parsed.payload) == bytes(record.payload)
    assert torch.equal(parsed.tensor(), record.tensor())
    if codec == "identity":
        assert torch.equal(parsed.tensor(), block)


def test_every_flipped_byte_is_detected() -> None:
    _, record = _record(torch.float32)
    data = record.to_bytes()
    for position in range(len(data)):
        flipped = bytearray(data)
        flipped[position] ^= 0x01
        with pytest.raises(CorruptBlockError):
            parse_record(bytes(flipped), KEY, NS)


@pytest.mark.parametrize("cut", [1, CHECKSUM_BYTES, 100, PREFIX_BYTES + 1, 10])
def test_truncated_records_are_corrupt(cut: int) -> None:
    data = _record()[1].to_bytes()
    with pytest.raises(CorruptBlockError):
        parse_record(data[:-cut], KEY, NS)
    with pytest.raises(CorruptBlockError):
        parse_record(data + b"\0" * cut, KEY, NS)


def test_other_namespace_and_other_hash_are_named() -> None:
    block, _ = _record()
    foreign = encode_block(KEY, OTHER_NS, block, make_codec("identity")).to_bytes()
    with pytest.raises(NamespaceMismatchError, match="namespace"):
        parse_record(foreign, KEY, NS)
    assert parse_record(foreign, KEY, None).namespace == OTHER_NS
    with pytest.raises(CorruptBlockError, match="stored as"):
        parse_record(_record()[1].to_bytes(), hashlib.sha256(b"x").digest(), NS)


def test_prefix_checks_magic_and_version() -> None:
    data = bytearray(_record()[1].to_bytes())
    prefix = parse_prefix(bytes(data[:PREFIX_BYTES]))
    assert (prefix.block_hash, prefix.namespace, prefix.total_len) == (KEY, NS, len(data))
    with pytest.raises(CorruptBlockError, match="fixed prefix"):
        parse_prefix(bytes(data[:10]))
    with pytest.raises(CorruptBlockError, match="format version 7"):
        parse_prefix(bytes(data[:8]) + struct.pack("<H", 7) + bytes(data[10:PREFIX_BYTES]))
    with pytest.raises(CorruptBlockError, match="starts with"):
        parse_prefix(b"GARBAGE!" + bytes(data[8:PREFIX_BYTES]))


def test_a_version_1_record_is_rejected_by_name() -> None:
    # Version 1 ended in a 32-byte SHA-256 of everything before it; this build reads version 2 only.
    data = bytearray(_record()[1].to_bytes()[:-CHECKSUM_BYTES])
    data[8:10] = struct.pack("<H", 1)
    old = bytes(data) + hashlib.sha256(bytes(data)).digest()
    with pytest.raises(UnsupportedFormatError, match="format version 1 is not read by this build") as err:
        parse_record(old, KEY, NS)
    assert isinstance(err.value, CorruptBlockError)  # so tiers drop and count it like any bad block


def test_sound_checksum_over_a_bad_payload_is_still_not_served() -> None:
    # A writer bug (payload shorter than the meta says) passes the checksum but fails at decode: still named.
    from ultra_adaptive_kv_cache_engine.compression import EncodedTensor

    _, good = _record(torch.float32)
    bad = seal(KEY, NS, EncodedTensor(good.meta, bytes(good.payload)[:-4]))
    parsed = parse_record(bad.to_bytes(), KEY, NS)
    with pytest.raises(CorruptBlockError, match="payload has"):
        parsed.tensor()


def test_keys_must_be_32_bytes() -> None:
    with pytest.raises(TypeError, match="bytes"):
        check_key("ab" * 16)
    with pytest.raises(ValueError, match="32 bytes"):
        check_key(b"short")
    with pytest.raises(ValueError, match="block_hash"):
        encode_block(b"x", NS, torch.zeros(1), make_codec("identity"))
