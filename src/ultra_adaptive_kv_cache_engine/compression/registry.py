"""The codec registry: CodecKind -> codec class. Unknown kinds raise ValueError listing the valid ones."""

from __future__ import annotations

from typing import Any

from ..types import CodecKind, parse_enum
from .codec import Codec, TensorMeta
from .fp8 import Fp8Codec
from .identity import IdentityCodec
from .int4 import Int4Codec
from .int8 import Int8Codec
from .zstd import ZstdCodec

CODECS: dict[CodecKind, type[Codec]] = {
    CodecKind.IDENTITY: IdentityCodec,
    CodecKind.INT8: Int8Codec,
    CodecKind.FP8: Fp8Codec,
    CodecKind.INT4: Int4Codec,
    CodecKind.ZSTD: ZstdCodec,
}


def register_codec(kind: CodecKind | str, cls: type[Codec]) -> None:
    """Register `cls` for `kind` (a CodecKind member or its value); replaces an earlier registration."""
    member = parse_enum(CodecKind, "codec", kind)
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise ValueError(f"codec {cls!r} must be a subclass of Codec")
    CODECS[member] = cls


def make_codec(kind: CodecKind | str, **options: Any) -> Codec:
    """A codec instance for `kind`; `options` go to its constructor (e.g. axis=-3 for int8 per channel)."""
    try:
        member = parse_enum(CodecKind, "codec", kind)
    except ValueError:
        member = None
    cls = CODECS.get(member) if member is not None else None
    if cls is None:
        valid = ", ".join(k.value for k in CODECS)
        raise ValueError(f"unknown codec {kind!r}; expected one of: {valid}")
    return cls(**options)


def decode_payload(payload: bytes | memoryview, meta: TensorMeta, out: Any = None) -> Any:
    """Decode with the codec registered for `meta.codec` (decode parameters come from `meta`, not options)."""
    return make_codec(meta.codec).decode(payload, meta, out)
