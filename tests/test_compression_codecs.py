"""Codec conformance: every registered codec, every float dtype; lossless ones bit-exact, lossy ones bounded."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression import CODECS, CodecError, TensorMeta, make_codec
from ultra_adaptive_kv_cache_engine.types import CodecKind

HAS_ZSTD = importlib.util.find_spec("zstandard") is not None
KINDS = [pytest.param(k, marks=pytest.mark.skipif(k is CodecKind.ZSTD and not HAS_ZSTD, reason="no zstandard"))
         for k in CODECS]
FLOATS = [torch.float32, torch.float16, torch.bfloat16]
BLOCK_SHAPE = (2, 2, 4, 3, 8)  # (layers, K/V, block_size, kv_heads, head_dim)


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = BLOCK_SHAPE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3.0
    x.view(-1)[:: 7] *= 40.0  # outliers, as real K has
    return x.to(dtype)


def _bound(codec, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound: the codec's stated slice bound plus one rounding step of the output dtype."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    eps = torch.finfo(x.dtype).eps
    return codec.max_error * absmax * (1 + 1e-5) + eps * (xf.abs() + codec.max_error * absmax) + 1e-30


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_round_trip_is_exact_or_bounded(kind: CodecKind, dtype: torch.dtype, record_property) -> None:
    codec = make_codec(kind)
    x = _sample(dtype)
    encoded = codec.encode(x)
    y = codec.decode(encoded.payload, encoded.meta)
    assert y.dtype == dtype and tuple(y.shape) == BLOCK_SHAPE and y.is_contiguous()
    err = (y.float() - x.float()).abs()
    record_property("max_abs_error", float(err.max()))
    record_property("ratio", encoded.nbytes / (x.numel() * x.element_size()))
    if codec.lossless:
        assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))
    else:
        assert bool((err <= _bound(codec, x)).all()), f"max error {float(err.max())}"
        assert float(err.max()) > 0  # it really is lossy: the bound is not vacuous
        assert encoded.nbytes < x.numel() * x.element_size() or dtype is not torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_encode_copies_and_meta_survives_json(kind: CodecKind) -> None:
    codec = make_codec(kind)
    x = _sample(torch.float32)
    original = x.clone()
    encoded = codec.encode(x)
    x.fill_(7.0)  # the caller reuses its buffer at once
    meta = TensorMeta.from_json(json.loads(json.dumps(encoded.meta.as_json())))
    assert meta == TensorMeta(encoded.meta.codec, encoded.meta.dtype, encoded.meta.shape, dict(encoded.meta.params))
    y = codec.decode(encoded.payload, meta)
    assert float((y - original).abs().max()) <= codec.max_error * float(original.abs().max())


@pytest.mark.parametrize("kind", KINDS)
def test_decode_into_out_fills_it(kind: CodecKind) -> None:
    codec = make_codec(kind)
    x = _sample(torch.bfloat16)
    encoded = codec.encode(x)
    out = torch.zeros(BLOCK_SHAPE, dtype=torch.bfloat16)
    result = codec.decode(encoded.payload, encoded.meta, out=out)
    assert result is out
    assert torch.equal(out, codec.decode(encoded.payload, encoded.meta))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cut", [1, 5])
def test_a_short_or_long_payload_is_a_codec_error(kind: CodecKind, cut: int) -> None:
    codec = make_codec(kind)
    encoded = codec.encode(_sample(torch.float16))
    with pytest.raises(CodecError):
        codec.decode(bytes(encoded.payload)[:-cut], encoded.meta)
    with pytest.raises(CodecError):
        codec.decode(bytes(encoded.payload) + b"\0" * cut, encoded.meta)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(), (1,), (0, 4), (3, 5)], ids=str)
def test_edge_shapes(kind: CodecKind, shape: tuple[int, ...]) -> None:
    codec = make_codec(kind)
    x = torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float32).reshape(shape) - 2.0
    encoded = codec.encode(x)
    y = codec.decode(encoded.payload, encoded.meta)
    assert tuple(y.shape) == shape and y.dtype == torch.float32
    if x.numel():
        assert float((y - x).abs().max()) <= codec.max_error * float(x.abs().max()) + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_a_codec_refuses_a_payload_of_another_codec(kind: CodecKind) -> None:
    other = CodecKind.INT8 if kind is not CodecKind.INT8 else CodecKind.IDENTITY
    encoded = make_codec(other).encode(_sample(torch.float32))
    with pytest.raises(CodecError, match="cannot decode"):
        make_codec(kind).decode(encoded.payload, encoded.meta)


@pytest.mark.parametrize("kind", [CodecKind.IDENTITY] + ([CodecKind.ZSTD] if HAS_ZSTD else []))
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn], ids=str)
def test_lossless_codecs_take_any_storable_dtype(kind: CodecKind, dtype: torch.dtype) -> None:
    x = (torch.arange(24) % 5).reshape(2, 3, 4).to(dtype)
    codec = make_codec(kind)
    encoded = codec.encode(x)
    assert torch.equal(codec.decode(encoded.payload, encoded.meta).view(torch.uint8), x.view(torch.uint8))


@pytest.mark.parametrize("kind", [CodecKind.INT8, CodecKind.FP8, CodecKind.INT4])
def test_quantisers_refuse_integer_tensors(kind: CodecKind) -> None:
    with pytest.raises(TypeError, match="float tensor"):
        make_codec(kind).encode(torch.arange(4))


def test_per_channel_axis_gives_one_scale_per_channel() -> None:
    x = _sample(torch.float32)
    per_token, per_channel = make_codec("int8"), make_codec("int8", axis=-3)
    n_token = x.numel() // x.shape[-1]
    n_channel = x.numel() // x.shape[-3]
    assert per_token.encode(x).nbytes == x.numel() + 4 * n_token
    enc = per_channel.encode(x)
    assert enc.meta.params == {"axis": 2} and enc.nbytes == x.numel() + 4 * n_channel
    err = (per_channel.decode(enc.payload, enc.meta) - x).abs()
    assert bool((err <= x.abs().amax(dim=2, keepdim=True) / 254 * (1 + 1e-5)).all())


def test_unknown_codec_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="identity, int8"):
        make_codec("lz77")
    with pytest.raises(ValueError, match="axis"):
        make_codec("int8", axis=9).encode(torch.zeros(2, 2))


def test_meta_from_json_rejects_bad_fields() -> None:
    with pytest.raises(CodecError, match="codec"):
        TensorMeta.from_json({"codec": "nope", "dtype": "float32", "shape": [1]})
    with pytest.raises(CodecError, match="dtype"):
        TensorMeta.from_json({"codec": "identity", "dtype": "complex64", "shape": [1]})
    with pytest.raises(CodecError, match="shape"):
        TensorMeta.from_json({"codec": "identity", "dtype": "float32", "shape": [-1]})
