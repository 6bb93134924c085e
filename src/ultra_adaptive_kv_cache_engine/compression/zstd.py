"""Lossless zstd over the raw bytes, with an optional byte-plane shuffle (needs the `zstandard` package).

The shuffle groups byte k of every element together (all exponent bytes, then all mantissa bytes), which is
what makes float KV compressible at all; it is undone exactly on decode.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from ..types import CodecKind
from . import quant
from .codec import Codec, CodecError, EncodedTensor, TensorMeta, bytes_to_tensor, dtype_name, tensor_to_bytes


def _zstandard() -> ModuleType:
    try:
        return importlib.import_module("zstandard")
    except ImportError:
        raise ValueError("the zstd codec needs the 'zstandard' package (pip install zstandard)") from None


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class ZstdCodec(Codec):
    """Payload = zstd frame of the (optionally byte-shuffled) raw bytes. Bit-exact for every dtype."""

    kind = CodecKind.ZSTD

    def __init__(self, level: int = 3, shuffle: bool = True) -> None:
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= 22:
            raise ValueError(f"level={level!r} must be an integer in [1, 22]")
        self._zstd = _zstandard()
        self.level = level
        self.shuffle = bool(shuffle)

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"zstd codec expects a torch.Tensor, got {type(tensor).__name__}")
        dtype_name(tensor.dtype)
        size = _itemsize(tensor.dtype)
        raw = tensor_to_bytes(tensor)
        if self.shuffle and size > 1 and tensor.numel():
            planes = quant.read_u8(memoryview(raw)).view(-1, size).t()
            raw = quant.join(planes)
        frame = self._zstd.ZstdCompressor(level=self.level).compress(raw)
        return EncodedTensor(self._meta(tensor, shuffle=self.shuffle), frame)

    def decode(self, payload: bytes | memoryview, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_meta(meta)
        dtype = meta.torch_dtype
        size = _itemsize(dtype)
        expected = meta.numel * size
        try:
            stream = self._zstd.ZstdDecompressor().decompressobj()
            raw = stream.decompress(bytes(payload))
        except self._zstd.ZstdError as exc:
            raise CodecError(f"zstd payload does not decompress: {exc}") from None
        if not stream.eof or stream.unused_data:
            raise CodecError("zstd payload is truncated or has trailing bytes")
        if len(raw) != expected:
            raise CodecError(f"zstd payload decompresses to {len(raw)} bytes; expected {expected}")
        if meta.params.get("shuffle") and size > 1 and expected:
            raw = quant.join(quant.read_u8(memoryview(raw)).view(size, -1).t())
        return bytes_to_tensor(raw, dtype, meta.shape, out)
