"""Pool formats: the exact byte layout of a slab on hand-made blocks, round-trip error bounds, the zero-scale
case and the registry's errors."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS, PoolFormat, get_pool_format

# bs=2 tokens, H=1 head, D=4: token 0 is [1, 2, 3, 4], token 1 is [0, -2, 5, 7].
TINY = torch.tensor([[[1.0, 2.0, 3.0, 4.0]], [[0.0, -2.0, 5.0, 7.0]]])[None]


def _f16_bytes(*values: float) -> list[int]:
    return torch.tensor(values, dtype=torch.float16).view(torch.uint8).tolist()


def _sample(n: int = 3, bs: int = 16, heads: int = 4, dim: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, bs, heads, dim), generator=g) * 2.0
    x[..., 5] += 6.0  # an outlier channel, as real keys have
    return x


def test_registry_and_attributes() -> None:
    assert list(POOL_FORMATS) == ["fp8", "int8", "int4", "int2"]
    assert [(f.name, f.bits, f.key_per_channel) for f in POOL_FORMATS.values()] == [
        ("fp8", 8, False), ("int8", 8, False), ("int4", 4, True), ("int2", 2, True)]
    assert get_pool_format("int4") is POOL_FORMATS["int4"]
    for bad in ("int3", "", None, 4):
        with pytest.raises(ValueError, match="expected one of: fp8, int8, int4, int2"):
            get_pool_format(bad)


def test_slab_bytes() -> None:
    # data + float16 params, rounded up to 16; K and V share the larger size.
    assert POOL_FORMATS["int8"].slab_bytes(2, 1, 4) == 16  # 8 + 2 * 2 = 12
    assert POOL_FORMATS["int4"].slab_bytes(2, 1, 4) == 32  # keys: 4 + 2 * (4 + 4) = 20
    assert POOL_FORMATS["int2"].slab_bytes(2, 1, 4) == 32  # keys: 2 + 16 = 18
    assert POOL_FORMATS["fp8"].slab_bytes(16, 8, 128) == 16 * 8 * 128 + 2 * 16 * 8  # 16640
    assert POOL_FORMATS["int4"].slab_bytes(16, 8, 128) == 8192 + 2 * (8 * 128) * 2  # data + scales and mins (H, D) in float16
    assert POOL_FORMATS["int2"].slab_bytes(16, 8, 128) == 4096 + 2 * (8 * 128) * 2
    with pytest.raises(ValueError, match="head_dim=6 must be a multiple of 4"):
        POOL_FORMATS["int2"].slab_bytes(16, 1, 6)
    with pytest.raises(ValueError, match="head_dim=5 must be a multiple of 2"):
        POOL_FORMATS["int8"].slab_bytes(16, 1, 5)
    with pytest.raises(ValueError, match="block_size=0 must be a positive int"):
        POOL_FORMATS["int8"].slab_bytes(0, 1, 4)


def test_int8_exact_slab() -> None:
    # token 0: s = 4/127 -> fp16 0.031494140625 (0x2808); q = round(x / s) = 32, 64, 95, 127
    # token 1: s = 7/127 -> fp16 0.05505371 (0x2B0E); q = 0, -36, 91, 127 (7 / s = 127.15 is clamped)
    slab = POOL_FORMATS["int8"].quantize(TINY, is_key=True)
    assert slab.dtype == torch.uint8 and tuple(slab.shape) == (1, 16)
    assert slab[0].tolist() == [32, 64, 95, 127, 0, 256 - 36, 91, 127, 0x08, 0x28, 0x0E, 0x2B, 0, 0, 0, 0]
    assert torch.equal(POOL_FORMATS["int8"].quantize(TINY, is_key=False), slab)  # keys and values alike


def test_fp8_exact_slab() -> None:
    scales = (torch.tensor([4.0, 7.0]) / 448).to(torch.float16)
    data = (TINY[0, :, 0] / scales.float()[:, None]).to(torch.float8_e4m3fn).view(torch.uint8)
    slab = POOL_FORMATS["fp8"].quantize(TINY, is_key=False)
    assert slab[0].tolist() == data.reshape(-1).tolist() + scales.view(torch.uint8).tolist() + [0] * 4
    assert slab[0, 3].item() == 0x7E and slab[0, 7].item() == 0x7E  # the absmax of each token is 448


def test_int4_values_exact_slab() -> None:
    # per token: token 0 mn 1, s = 3/15 -> fp16 0.19995; q = 0, 5, 10, 15 -> bytes 0 | 5 << 4, 10 | 15 << 4
    # token 1 mn -2, s = 9/15 -> fp16 0.60010; q = 3, 0, 12, 15 -> bytes 3, 12 | 15 << 4
    slab = POOL_FORMATS["int4"].quantize(TINY, is_key=False)
    assert slab[0].tolist() == [80, 250, 3, 252, *_f16_bytes(0.2, 0.6), *_f16_bytes(1.0, -2.0)] + [0] * 20


def test_int4_keys_exact_slab() -> None:
    # per channel over the two tokens: every channel's min and max are its two values, so token 0 has levels
    # 15, 15, 0, 0 (bytes 255, 0) and token 1 has 0, 0, 15, 15 (bytes 0, 255); scales (H, D) then mins (H, D)
    slab = POOL_FORMATS["int4"].quantize(TINY, is_key=True)
    scales = _f16_bytes(1 / 15, 4 / 15, 2 / 15, 3 / 15)
    assert slab[0].tolist() == [255, 0, 0, 255, *scales, *_f16_bytes(0.0, -2.0, 3.0, 4.0)] + [0] * 12


def test_int2_exact_slab() -> None:
    # values, token 1: mn -2, s = 3; q = round([2, 0, 7, 9] / 3) = 1, 0, 2, 3 -> 1 | 0 << 2 | 2 << 4 | 3 << 6
    # token 0: mn 1, s = 1 (fp16 1.0); q = 0, 1, 2, 3 -> 0 | 1 << 2 | 2 << 4 | 3 << 6 = 228
    slab = POOL_FORMATS["int2"].quantize(TINY, is_key=False)
    assert slab[0].tolist() == [228, 225, *_f16_bytes(1.0, 3.0), *_f16_bytes(1.0, -2.0)] + [0] * 22
    keys = POOL_FORMATS["int2"].quantize(TINY, is_key=True)
    assert keys[0, :2].tolist() == [0b00001111, 0b11110000]  # levels 3, 3, 0, 0 then 0, 0, 3, 3


@pytest.mark.parametrize("name", ["int8", "int4", "int2"])
@pytest.mark.parametrize("is_key", [True, False])
def test_integer_round_trip_within_half_a_step(name: str, is_key: bool) -> None:
    fmt = POOL_FORMATS[name]
    x = _sample()
    slabs = fmt.quantize(x, is_key)
    assert tuple(slabs.shape) == (3, fmt.slab_bytes(16, 4, 64))
    y = fmt.dequantize(slabs, is_key, 16, 4, 64, torch.float32)
    err = (y - x).abs()
    if name == "int8":
        step = x.abs().amax(dim=-1, keepdim=True) / 127
        slack = 1e-6
    else:
        dim = 1 if fmt.key_per_channel and is_key else -1
        mn, mx = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
        step = (mx - mn) / fmt.levels  # type: ignore[attr-defined]
        slack = mn.abs() * 2.0**-11 + 1e-6  # the float16 rounding of the stored min
    assert bool((err <= step * (0.5 + 2.0**-10) + slack).all()), float((err - step / 2).max())
    assert float(err.max()) > 0


@pytest.mark.parametrize("is_key", [True, False])
def test_fp8_round_trip_relative(is_key: bool) -> None:
    fmt = POOL_FORMATS["fp8"]
    x = _sample()
    y = fmt.dequantize(fmt.quantize(x, is_key), is_key, 16, 4, 64, torch.float32)
    amax = x.abs().amax(dim=-1, keepdim=True)
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative, and 2^-9 * s below the normal range
    assert bool(((y - x).abs() <= x.abs() * 2.0**-4 + amax / 448 * 2.0**-9 * 1.01 + 1e-6).all())


@pytest.mark.parametrize("name", list(POOL_FORMATS))
def test_constant_block_uses_scale_one_and_is_exact(name: str) -> None:
    fmt = POOL_FORMATS[name]
    x = torch.full((2, 4, 2, 8), 0.0)
    x[1] = 3.0  # all equal: the affine formats store s = 1 and mn = 3; the symmetric ones s = 3 / qmax
    for is_key in (True, False):
        slabs = fmt.quantize(x, is_key)
        y = fmt.dequantize(slabs, is_key, 4, 2, 8, torch.float32)
        assert torch.equal(y[0], x[0])
        if fmt.key_per_channel:  # mn = 3 exactly, q = 0
            assert torch.equal(y[1], x[1])
        data = fmt.data_bytes(4, 2, 8)
        first_scale = slabs[0, data : data + 2].view(torch.float16).item()
        assert first_scale == 1.0  # the all-zero block: a zero scale is stored as 1


@pytest.mark.parametrize("name", list(POOL_FORMATS))
def test_dtype_device_and_bad_input(name: str) -> None:
    fmt = POOL_FORMATS[name]
    x = _sample(2, 4, 2, 8).to(torch.bfloat16)
    slabs = fmt.quantize(x, True)
    assert slabs.device == x.device and slabs.dtype == torch.uint8
    assert fmt.dequantize(slabs, True, 4, 2, 8, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="quantizes a float tensor"):
        fmt.quantize(torch.zeros((4, 2, 8)), True)
    with pytest.raises(ValueError, match="dequantizes uint8 slabs"):
        fmt.dequantize(slabs[:, 1:], True, 4, 2, 8, torch.float32)
    assert isinstance(fmt, PoolFormat)


@pytest.mark.parametrize("name", list(POOL_FORMATS))
def test_dequantize_params_at_an_odd_byte_offset(name: str) -> None:
    # One slab whose float16 parameters start at an odd byte of its storage: int4 keeps 3 tokens of one
    # 2-channel head in 3 data bytes; every format's slab also sits at byte 1 of a larger buffer.
    fmt = POOL_FORMATS[name]
    dim = 4 if name == "int2" else 2
    x = torch.randn((1, 3, 1, dim), generator=torch.Generator().manual_seed(1)) * 2.0
    for is_key in (True, False):
        slab = fmt.quantize(x, is_key)
        expected = fmt.dequantize(slab.clone(), is_key, 3, 1, dim, torch.float32)
        buffer = torch.zeros(slab.numel() + 1, dtype=torch.uint8)
        buffer[1:] = slab.reshape(-1)
        shifted = buffer[1:].view(1, -1)
        assert shifted.storage_offset() == 1
        assert torch.equal(fmt.dequantize(shifted, is_key, 3, 1, dim, torch.float32), expected)
        assert torch.equal(fmt.dequantize(slab, is_key, 3, 1, dim, torch.float32), expected)
    if name == "int4":
        assert fmt.data_bytes(3, 1, 2) == 3  # the parameters of the unshifted slab start at byte 3
