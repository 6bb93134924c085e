"""`CompressorCodec`: a user's `AdvancedCompressor` subclass as the codec of any tier, registered by name.

The seed's extension point is a compressor (`compress(tensor) -> bytes`, `decompress(bytes) -> tensor`);
the tiers' is a `Codec`. `register_compressor("mine", MyCompressor)` joins the two: it adds the member
`CodecKind("mine")` and registers a codec whose payload is exactly what `MyCompressor().compress` returns and
whose decode is what its `decompress` returns. So `KVCacheConfig(codec="mine")` or `TierConfig(codec="mine")`
makes the CPU, disk and Redis tiers store the user's bytes, and every stored block names "mine" in its header
(and the namespace carries the codec name), so a block compressed one way is never served as another.

Invariants: `decode` returns the compressor's tensor only if it has the block's dtype and shape (else
`CodecError`: nothing is silently cast); anything `decompress` raises becomes a `CodecError`, so a tier drops
that block as corrupt instead of failing the request. A compressor is lossy unless registered with
`lossless=True` (the memory optimizer then measures its error before choosing it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from ..types import CodecKind
from .codec import Codec, CodecError, EncodedTensor, TensorMeta, dtype_name
from .compressor import AdvancedCompressor
from .registry import CODECS, register_codec


class CompressorCodec(Codec):
    """The codec of one registered compressor class (`register_compressor` makes one subclass per name)."""

    compressor_class: ClassVar[type[AdvancedCompressor]] = AdvancedCompressor
    options: ClassVar[Mapping[str, Any]] = {}
    lossless = False

    def __init__(self) -> None:
        self.compressor = self.compressor_class(**self.options)

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{self.kind.value} codec expects a torch.Tensor, got {type(tensor).__name__}")
        dtype_name(tensor.dtype)
        data = self.compressor.compress(tensor)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"{type(self.compressor).__name__}.compress returned {type(data).__name__}; "
                            "expected bytes")
        return EncodedTensor(self._meta(tensor), bytes(data))

    def decode(self, payload: bytes | memoryview, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_meta(meta)
        name = type(self.compressor).__name__
        try:
            tensor = self.compressor.decompress(bytes(payload))
        except Exception as exc:  # user code: whatever it raises, the block is not served
            raise CodecError(f"{name}.decompress failed: {type(exc).__name__}: {exc}") from exc
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"{name}.decompress returned {type(tensor).__name__}; expected a torch.Tensor")
        if tensor.dtype != meta.torch_dtype or tuple(tensor.shape) != meta.shape:
            raise CodecError(f"{name}.decompress returned {tensor.dtype} {tuple(tensor.shape)}; the block is "
                             f"{meta.dtype} {meta.shape}")
        tensor = tensor.detach().cpu().contiguous()
        if out is None:
            return tensor
        if out.numel() != tensor.numel():
            raise ValueError(f"out has {out.numel()} elements; the payload decodes to {tensor.numel()}")
        out.copy_(tensor.reshape(out.shape))
        return out


def register_compressor(
    name: str, compressor: type[AdvancedCompressor], *, lossless: bool = False, **options: Any
) -> CodecKind:
    """Register `compressor` (an `AdvancedCompressor` subclass, built with `options` per codec instance) as the
    codec `name`; returns its `CodecKind` member, usable wherever a codec is named. Registering a name again
    replaces its compressor; a built-in codec's name cannot be taken."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"compressor name {name!r} must be an identifier such as 'my_codec'")
    if not (isinstance(compressor, type) and issubclass(compressor, AdvancedCompressor)):
        raise ValueError(f"compressor {compressor!r} must be a subclass of AdvancedCompressor")
    value = name.lower()
    try:
        existing = CODECS.get(CodecKind(value))
    except ValueError:
        existing = None
    if existing is not None and not issubclass(existing, CompressorCodec):
        raise ValueError(f"codec name {value!r} is a built-in codec; choose another name")
    compressor(**options)  # fails here, naming the bad option, rather than at the first block stored
    setattr(CodecKind, value.upper(), value)  # an extensible enum: this adds the member
    kind = CodecKind(value)
    attrs = {"kind": kind, "compressor_class": compressor, "options": dict(options), "lossless": bool(lossless)}
    register_codec(kind, type(f"{compressor.__name__}Codec", (CompressorCodec,), attrs))
    return kind
