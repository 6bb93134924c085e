"""The codec interface: a tensor becomes payload bytes plus a small JSON-able `TensorMeta`, and back.

Invariants every codec keeps:
- `encode` never aliases the input: the payload is a fresh copy, so the caller may reuse the tensor at once.
- `decode` returns a fresh, writable, contiguous CPU tensor of `meta.dtype` and `meta.shape` (or fills `out`).
- `meta` holds only JSON types (str, int, float, bool, lists, dicts), so it can sit in a JSON header.
- Lossless codecs (`lossless = True`) round-trip bit-exactly for every supported dtype, bfloat16 included.
- A lossy codec states its bound: |decode(encode(x)) - x| <= `max_error` * absmax(x) over each quantisation
  slice, plus one rounding step of the output dtype.
- A payload that does not match its meta raises `CodecError` (a ValueError), never returns garbage.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..types import CodecKind

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""Dtypes a payload may declare, by name. Names, not `str(dtype)`, are what headers carry."""

_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16, torch.float64})


class CodecError(ValueError):
    """A payload or meta that a codec cannot decode (wrong length, unknown dtype, bad parameters)."""


def dtype_name(dtype: torch.dtype) -> str:
    """The header name of `dtype`; TypeError for dtypes no codec stores (e.g. complex)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        raise TypeError(f"dtype={dtype} is not storable; expected one of: {', '.join(DTYPES)}")
    return name


def dtype_from_name(name: object) -> torch.dtype:
    """The torch dtype named `name`; CodecError for unknown names."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise CodecError(f"dtype {name!r} is unknown; expected one of: {', '.join(DTYPES)}")
    return dtype


@dataclass(frozen=True)
class TensorMeta:
    """What a decoder needs besides the payload: codec, original dtype and shape, codec parameters."""

    codec: CodecKind
    dtype: str
    shape: tuple[int, ...]
    params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    def as_json(self) -> dict[str, Any]:
        return {"codec": self.codec.value, "dtype": self.dtype, "shape": list(self.shape), "params": dict(self.params)}

    @classmethod
    def from_json(cls, obj: object) -> TensorMeta:
        """Parse and validate a header object; CodecError naming the bad field."""
        if not isinstance(obj, dict):
            raise CodecError(f"tensor meta must be an object, got {type(obj).__name__}")
        try:
            codec = CodecKind(obj.get("codec"))
        except ValueError:
            raise CodecError(f"codec {obj.get('codec')!r} is unknown") from None
        dtype = obj.get("dtype")
        dtype_from_name(dtype)
        shape = obj.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise CodecError(f"shape {shape!r} must be a list of non-negative integers")
        params = obj.get("params", {})
        if not isinstance(params, dict):
            raise CodecError(f"params {params!r} must be an object")
        return cls(codec=codec, dtype=dtype, shape=tuple(shape), params=params)


@dataclass(frozen=True)
class EncodedTensor:
    """A codec's output: the payload bytes and the meta that decodes them."""

    meta: TensorMeta
    payload: bytes | memoryview

    @property
    def nbytes(self) -> int:
        return memoryview(self.payload).nbytes


def tensor_to_bytes(tensor: torch.Tensor) -> bytes | memoryview:
    """A fresh copy of the raw bytes of `tensor` in C order (any dtype; bfloat16 via a uint8 view)."""
    t = tensor.detach()
    if t.device.type != "cpu":  # the device-to-host copy is already fresh: no second copy
        return memoryview(t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    flat = t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).clone().numpy())


def uint8_view(data: bytes | memoryview) -> torch.Tensor:
    """A 1-D uint8 tensor ALIASING `data` (no copy); callers copy out of it and never write into it."""
    view = memoryview(data).cast("B")
    if view.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    if view.readonly:  # torch warns about read-only buffers; this alias is only ever read
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=torch.uint8)
    return torch.frombuffer(view, dtype=torch.uint8)


def writable_bytes(tensor: torch.Tensor) -> memoryview | None:
    """A writable byte view ALIASING `tensor`'s memory (C order), or None unless it is a non-empty contiguous CPU
    tensor. What a file or socket read fills directly, so the bytes land where the tensor already lives."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
        return None
    flat = tensor.detach() if tensor.requires_grad else tensor
    if flat.dim() == 0:
        flat = flat.reshape(1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def bytes_to_tensor(
    data: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...], out: torch.Tensor | None = None
) -> torch.Tensor:
    """A fresh tensor (or `out`, filled) holding `data` reinterpreted as `dtype` of `shape`. One copy (a plain
    memcpy into a contiguous CPU `out`: byte copies run at memory speed, dtype-typed ones slower for bf16)."""
    view = memoryview(data).cast("B")
    expected = _numel(shape) * _itemsize(dtype)
    if view.nbytes != expected:
        raise CodecError(f"payload has {view.nbytes} bytes; {dtype} of shape {shape} needs {expected}")
    if out is not None and out.dtype == dtype:
        target = writable_bytes(out)
        if target is not None and target.nbytes == expected:
            target[:] = view
            return out
    src = uint8_view(view)
    result = src.clone().view(dtype).reshape(shape) if expected else torch.empty(shape, dtype=dtype)
    if out is not None:
        out.copy_(result.reshape(out.shape))
        return out
    return result


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def check_float(tensor: object, codec: str) -> torch.Tensor:
    """`tensor` if it is a floating tensor a quantising codec accepts; TypeError otherwise."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{codec} codec expects a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{codec} codec expects a float tensor (float32/float16/bfloat16/float64), got {tensor.dtype}")
    return tensor


class Codec(ABC):
    """Encodes one tensor to bytes and back. Stateless after construction; safe to share between threads."""

    kind: ClassVar[CodecKind]
    lossless: ClassVar[bool] = True
    max_error: ClassVar[float] = 0.0
    """For lossy codecs: the error bound relative to the absmax of each quantisation slice."""

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> EncodedTensor: ...

    @abstractmethod
    def decode(self, payload: bytes | memoryview, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor that `payload` encodes; fills `out` (same numel) when given. CodecError on a bad payload."""

    def _meta(self, tensor: torch.Tensor, **params: Any) -> TensorMeta:
        return TensorMeta(self.kind, dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape), params)

    def _check_meta(self, meta: TensorMeta) -> None:
        if meta.codec is not self.kind:
            raise CodecError(f"{self.kind.value} codec cannot decode a {meta.codec.value} payload")
