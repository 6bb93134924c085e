"""`AdvancedCompressor`: the seed's tensor compressor. `compress(tensor) -> bytes`, `decompress(bytes) -> tensor`.

Format (self-describing, no pickle): b"UAKC" | version u16 | reserved u16 | header length u32 (little endian)
| JSON header {"codec", "dtype", "shape", "params"} | codec payload. `decompress` decodes with the codec named
in the header, so data written with any codec reads back with any compressor instance. The default codec
(identity) round-trips bit-exactly; lossy codecs keep their stated bound (see `compression.codec`).

Users subclass it and override both methods (the seed's `CustomCompressor`); the engine only calls those two.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch

from ..types import CodecKind
from .codec import Codec, CodecError, TensorMeta
from .registry import decode_payload, make_codec

MAGIC = b"UAKC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHI")
MAX_HEADER = 1 << 20


class AdvancedCompressor:
    """Compresses one tensor to self-describing bytes with a registered codec (identity by default)."""

    def __init__(self, codec: CodecKind | str = CodecKind.IDENTITY, **options: Any) -> None:
        self.codec: Codec = make_codec(codec, **options)

    @property
    def lossless(self) -> bool:
        return self.codec.lossless

    def compress(self, tensor: torch.Tensor) -> bytes:
        """Header + payload for `tensor` (any device; the bytes describe a CPU tensor of the same dtype)."""
        encoded = self.codec.encode(tensor)
        header = json.dumps(encoded.meta.as_json(), separators=(",", ":"), sort_keys=True).encode()
        return b"".join((_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header)), header, encoded.payload))

    def decompress(self, data: bytes) -> torch.Tensor:
        """The tensor that `data` describes, on CPU; ValueError (CodecError) for anything malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"decompress expects bytes, got {type(data).__name__}")
        view = memoryview(data).cast("B")
        if view.nbytes < _PREFIX.size:
            raise CodecError(f"compressed data has {view.nbytes} bytes; a header needs at least {_PREFIX.size}")
        magic, version, _reserved, header_len = _PREFIX.unpack_from(view)
        if magic != MAGIC:
            raise CodecError(f"compressed data starts with {bytes(magic)!r}; expected {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise CodecError(f"compressed data has format version {version}; this build reads {FORMAT_VERSION}")
        end = _PREFIX.size + header_len
        if header_len > MAX_HEADER or end > view.nbytes:
            raise CodecError(f"header length {header_len} does not fit in {view.nbytes} bytes")
        try:
            obj = json.loads(bytes(view[_PREFIX.size : end]))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CodecError(f"header is not valid JSON: {exc}") from None
        meta = TensorMeta.from_json(obj)
        return decode_payload(view[end:], meta)
