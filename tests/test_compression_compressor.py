"""The seed's `AdvancedCompressor`: self-describing bytes, exact by default, subclassable."""

from __future__ import annotations

import struct

import pytest
import torch

from ultra_adaptive_kv_cache_engine import AdvancedCompressor
from ultra_adaptive_kv_cache_engine.compression import CodecError


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
