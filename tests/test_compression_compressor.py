"""The seed's `AdvancedCompressor`: self-describing bytes, exact by default, subclassable; a user's subclass
registered by name is the codec of real CPU, disk and Redis tiers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest
import torch
from redis_server import RedisServer

from ultra_adaptive_kv_cache_engine import AdvancedCompressor
from ultra_adaptive_kv_cache_engine.cache.tier_list import build_tiers, namespace_codec
from ultra_adaptive_kv_cache_engine.compression import (
    CODECS,
    CodecError,
    EncodedTensor,
    make_codec,
    register_compressor,
)
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig, TierConfig
from ultra_adaptive_kv_cache_engine.prefix import Namespace
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, DiskTier, RedisTier, encode_block, seal
from ultra_adaptive_kv_cache_engine.types import CodecKind


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32], ids=str)
def test_default_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    x = (torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    data = AdvancedCompressor().compress(x)
    assert isinstance(data, bytes) and data[:4] == b"UAKC"
    y = AdvancedCompressor().decompress(data)
    assert y.dtype == dtype and y.shape == x.shape and torch.equal(y, x)


def test_data_names_its_codec_so_any_instance_reads_it() -> None:
    x = torch.randn(4, 16)
    data = AdvancedCompressor("int8").compress(x)
    assert AdvancedCompressor().lossless and not AdvancedCompressor("int8").lossless
    y = AdvancedCompressor().decompress(data)  # an identity compressor reads int8 data
    assert float((y - x).abs().max()) <= float(x.abs().max()) / 254 * 1.0001
    assert len(data) < x.numel() * 4


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"XXXX" + b[4:], "expected b'UAKC'"),
        (lambda b: b[:4] + struct.pack("<H", 9) + b[6:], "format version 9"),
        (lambda b: b[:8] + struct.pack("<I", 1 << 30) + b[12:], "header length"),
        (lambda b: b[:12] + b"[" + b[13:], "not valid JSON"),
        (lambda b: b[:-1], "bytes"),
        (lambda b: b[:5], "at least"),
    ],
)
def test_malformed_data_is_a_clear_value_error(mutate, message: str) -> None:
    data = AdvancedCompressor().compress(torch.arange(6, dtype=torch.float32))
    with pytest.raises(CodecError, match=message):
        AdvancedCompressor().decompress(mutate(data))
    assert issubclass(CodecError, ValueError)


def test_decompress_rejects_non_bytes() -> None:
    with pytest.raises(TypeError, match="bytes"):
        AdvancedCompressor().decompress("abc")  # type: ignore[arg-type]


def test_the_seed_custom_compressor_pattern() -> None:
    class CustomCompressor(AdvancedCompressor):
        """Stores float16 halves: the user's own logic behind the same two methods."""

        def compress(self, tensor: torch.Tensor) -> bytes:
            return super().compress(tensor.to(torch.float16))

        def decompress(self, data: bytes) -> torch.Tensor:
            return super().decompress(data).to(torch.float32)

    x = torch.tensor([1.0, 0.5, -2.25])
    c = CustomCompressor()
    assert isinstance(c, AdvancedCompressor)
    assert torch.equal(c.decompress(c.compress(x)), x)


# -- a user's compressor as the codec of the tiers ----------------------------------------------------------------
class ReversingCompressor(AdvancedCompressor):
    """The user's own bytes: a tag, then the default format reversed; counts its calls."""

    calls = {"compress": 0, "decompress": 0}

    def compress(self, tensor: torch.Tensor) -> bytes:
        ReversingCompressor.calls["compress"] += 1
        return b"MINE" + super().compress(tensor)[::-1]

    def decompress(self, data: bytes) -> torch.Tensor:
        ReversingCompressor.calls["decompress"] += 1
        if data[:4] != b"MINE":
            raise ValueError("not mine")
        return super().decompress(data[4:][::-1])


NS = hashlib.sha256(b"compressor-codec-tests").digest()
X = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
KEY = hashlib.sha256(b"block").digest()


@pytest.fixture
def mine():
    """The compressor registered as codec "mine" for one test (the registry entry is removed after it)."""
    ReversingCompressor.calls.update(compress=0, decompress=0)
    kind = register_compressor("mine", ReversingCompressor)
    yield kind
    CODECS.pop(kind, None)


def test_a_registered_compressor_is_a_named_codec(mine) -> None:
    assert mine is CodecKind("mine") and mine.value == "mine" and CodecKind.MINE is mine
    codec = make_codec("mine")
    assert codec.kind is mine and not codec.lossless and isinstance(codec.compressor, ReversingCompressor)
    encoded = codec.encode(X)
    assert bytes(encoded.payload) == ReversingCompressor().compress(X)  # exactly the user's bytes
    assert encoded.meta.codec is mine and encoded.meta.shape == (2, 4, 8)
    assert torch.equal(codec.decode(encoded.payload, encoded.meta), X)
    out = torch.empty(2, 4, 8)
    assert codec.decode(encoded.payload, encoded.meta, out) is out and torch.equal(out, X)
    assert register_compressor("mine", ReversingCompressor, lossless=True) is mine  # again: replaces it
    assert make_codec("mine").lossless


def test_config_and_tier_config_take_the_registered_name(mine) -> None:
    assert KVCacheConfig(codec="mine").codec is mine
    assert TierConfig("disk", codec="MINE").codec is mine
    with pytest.raises(ValueError, match="codec='nope' is not valid; expected one of: .*mine"):
        KVCacheConfig(codec="nope")
    with pytest.raises(ValueError, match="unknown codec 'nope'; expected one of: .*mine"):
        make_codec("nope")


def test_registration_errors_name_the_problem(mine) -> None:
    with pytest.raises(ValueError, match="built-in codec"):
        register_compressor("int8", ReversingCompressor)
    with pytest.raises(ValueError, match="subclass of AdvancedCompressor"):
        register_compressor("other", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="identifier"):
        register_compressor("my codec", ReversingCompressor)
    with pytest.raises(ValueError, match="unknown codec 'nope'"):
        register_compressor("other", ReversingCompressor, codec="nope")  # the options are tried at once


def test_round_trip_through_a_real_cpu_tier_and_disk_tier(mine, tmp_path: Path) -> None:
    record = encode_block(KEY, NS, X, make_codec("mine"))
    assert bytes(record.payload) == ReversingCompressor().compress(X)
    cpu = CPUTier(NS, 1 << 20, pin_memory=False)
    disk = DiskTier(NS, tmp_path, 1 << 20, fsync="never", io_threads=1)
    for tier in (cpu, disk):
        assert tier.put(KEY, record).stored
        stored = tier.get(KEY)
        assert stored is not None and stored.meta.codec is mine
        assert bytes(stored.payload) == bytes(record.payload)  # the tier stores what compress returned
        assert torch.equal(stored.tensor(), X)  # and serves what decompress returns
        out = torch.empty(2, 4, 8)
        assert tier.get_into(KEY, out) and torch.equal(out, X)
    warm = DiskTier(NS, tmp_path, 1 << 20, fsync="never", io_threads=1, verify_on_scan=True)  # a restart
    assert torch.equal(warm.get(KEY).tensor(), X)  # type: ignore[union-attr]
    assert ReversingCompressor.calls["decompress"] >= 5


def test_round_trip_through_a_real_redis_tier(mine, tmp_path: Path) -> None:
    server = RedisServer.start(tmp_path / "redis")
    try:
        tier = RedisTier(NS, server.url, prefix="kv:", ttl_s=100)
        record = encode_block(KEY, NS, X, make_codec("mine"))
        assert tier.put(KEY, record).stored
        stored = tier.get(KEY)
        assert stored is not None and stored.meta.codec is mine
        assert bytes(stored.payload) == ReversingCompressor().compress(X)  # Redis holds what compress returned
        out = torch.empty(2, 4, 8)
        assert tier.get_into(KEY, out) and torch.equal(out, X)
    finally:
        server.stop()


def test_a_block_that_does_not_decompress_is_dropped_never_served(mine, tmp_path: Path) -> None:
    codec = make_codec("mine")
    bad = seal(KEY, NS, EncodedTensor(codec._meta(X), b"XXXX" + bytes(16)))  # sound record, foreign bytes
    disk = DiskTier(NS, tmp_path, 1 << 20, fsync="never", io_threads=1)
    disk.put(KEY, bad)
    assert not disk.get_into(KEY, torch.empty(2, 4, 8))
    assert not disk.contains(KEY) and disk.usage().counters["corrupt_dropped"] == 1
    with pytest.raises(CodecError, match="decompress failed: ValueError: not mine"):
        codec.decode(b"XXXX", codec._meta(X))


def test_the_codec_name_is_part_of_the_namespace(mine) -> None:
    base = {"model_id": "m", "weights_fingerprint": "w", "tokenizer_id": "t", "dtype": "float32",
            "block_size": 4, "layout_version": 1}
    assert Namespace(**base, codec="mine").digest != Namespace(**base, codec="identity").digest


def test_a_tier_configured_with_the_compressor_stores_its_bytes(mine, tmp_path: Path) -> None:
    config = KVCacheConfig(persistence_path=str(tmp_path), fsync_policy="never",
                           tiers=(TierConfig("cpu", 1 << 20), TierConfig("disk", 1 << 20, codec="mine")))
    tiers, write_codec = build_tiers(config, NS)
    assert write_codec is not None and write_codec.kind is CodecKind.IDENTITY
    assert namespace_codec(config) == "cpu=identity,disk=mine"  # the namespace names the codec of each tier
    disk = tiers[1]
    assert disk.put(KEY, encode_block(KEY, NS, X, write_codec)).stored  # an identity block, recoded on its way in
    stored = disk.get(KEY)
    assert stored is not None and stored.meta.codec is mine
    assert bytes(stored.payload) == ReversingCompressor().compress(X) and torch.equal(stored.tensor(), X)
