"""Shared pieces of the quantising codecs: slice layout along one axis, scale packing, payload splitting, and
`SliceCodec`, the base class that runs their common encode/decode steps.

A quantising codec reduces along one `axis` (the absmax or min/max is taken over it), so there is one scale per
slice: `numel // shape[axis]` scales, in C order of the shape with `axis` set to 1. Scales travel as float32.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from .codec import Codec, CodecError, EncodedTensor, TensorMeta, bytes_to_tensor, check_float, uint8_view


class SliceCodec(Codec):
    """A lossy codec with one set of scales per slice along `axis` (an int; negative counts from the end).

    `encode` validates and converts the tensor (float32, CPU, at least 1-d), records the normalised axis in the
    meta's params, and packs the tensors `_quantize` returns; an empty tensor has an empty payload. `decode`
    validates the meta and casts `_dequantize`'s float32 reconstruction back to the meta's dtype and shape.
    """

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis={axis!r} must be an integer")
        self.axis = axis

    @abstractmethod
    def _quantize(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
        """The payload's parts, in order, for a non-empty float32 `x` reduced along `axis` (non-negative)."""

    @abstractmethod
    def _dequantize(self, payload: bytes | memoryview, meta: TensorMeta, shape: tuple[int, ...], axis: int
                    ) -> torch.Tensor:
        """The float32 reconstruction of shape `shape` from a non-empty payload; CodecError if it is malformed."""

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        x = as_work(check_float(tensor, self.kind.value))
        axis = normalize_axis(self.axis, x.dim())
        if x.numel() == 0:
            return EncodedTensor(self._meta(tensor, axis=axis), b"")
        return EncodedTensor(self._meta(tensor, axis=axis), join(*self._quantize(x, axis)))

    def decode(self, payload: bytes | memoryview, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_meta(meta)
        shape = work_shape(meta)
        axis = meta_axis(meta)
        if meta.numel == 0:
            split(payload, [0])
            return finish(torch.empty(shape), meta, out)
        return finish(self._dequantize(payload, meta, shape, axis), meta, out)


def nonzero_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` with its zeros (all-equal slices) replaced by 1, so dividing by it is always defined."""
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def absmax_scale(x: torch.Tensor, axis: int, qmax: float) -> torch.Tensor:
    """The symmetric scale of each slice along `axis`: absmax / `qmax` (1 for an all-zero slice), keepdim."""
    return nonzero_scale(x.abs().amax(dim=axis, keepdim=True) / qmax)


def read_scaled(payload: bytes | memoryview, meta: TensorMeta, shape: tuple[int, ...], axis: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A symmetric payload (float32 scales, then one byte per element) as (scales, values of `dtype` in
    `shape`); CodecError unless the payload has exactly those bytes."""
    scales_b, values_b = split(payload, [4 * slice_count(shape, axis), meta.numel])
    return read_f32(scales_b, scale_shape(shape, axis)), read_u8(values_b).view(dtype).reshape(shape)


def normalize_axis(axis: int, ndim: int) -> int:
    """`axis` as a non-negative index into a tensor of `ndim` dims; ValueError when out of range."""
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis={axis!r} is out of range for a tensor of {ndim} dims")
    return axis % ndim


def as_work(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 CPU view/copy of `tensor` with at least one dim (a 0-d tensor becomes shape (1,))."""
    x = tensor.detach()
    if x.device.type != "cpu":
        x = x.cpu()
    x = x.float()
    return x.reshape(1) if x.dim() == 0 else x


def work_shape(meta: TensorMeta) -> tuple[int, ...]:
    return meta.shape if meta.shape else (1,)


def meta_axis(meta: TensorMeta) -> int:
    """The axis recorded in `meta.params`, validated against the shape; CodecError otherwise."""
    axis = meta.params.get("axis")
    ndim = len(work_shape(meta))
    if type(axis) is not int or not 0 <= axis < ndim:
        raise CodecError(f"axis {axis!r} in codec params is not valid for shape {meta.shape}")
    return axis


def slice_count(shape: tuple[int, ...], axis: int) -> int:
    n = 1
    for i, d in enumerate(shape):
        if i != axis:
            n *= d
    return n


def scale_shape(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    return tuple(1 if i == axis else d for i, d in enumerate(shape))


def join(*parts: torch.Tensor) -> bytes:
    """The raw bytes of each (CPU, contiguous) tensor, concatenated."""
    return b"".join(p.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for p in parts)


def split(payload: bytes | memoryview, sizes: list[int]) -> list[memoryview]:
    """`payload` cut into consecutive pieces of `sizes` bytes; CodecError unless the sizes add up exactly."""
    view = memoryview(payload).cast("B")
    if view.nbytes != sum(sizes):
        raise CodecError(f"payload has {view.nbytes} bytes; expected {sum(sizes)}")
    out, offset = [], 0
    for size in sizes:
        out.append(view[offset : offset + size])
        offset += size
    return out


def read_f32(data: memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    return bytes_to_tensor(data, torch.float32, shape)


def read_u8(data: memoryview) -> torch.Tensor:
    """A fresh uint8 tensor with a copy of `data`."""
    return uint8_view(data).clone()


def finish(result: torch.Tensor, meta: TensorMeta, out: torch.Tensor | None) -> torch.Tensor:
    """Cast the float32 reconstruction to the meta's dtype and shape, into `out` when given."""
    result = result.reshape(meta.shape).to(meta.torch_dtype)
    if out is None:
        return result
    if out.numel() != result.numel():
        raise ValueError(f"out has {out.numel()} elements; the payload decodes to {result.numel()}")
    out.copy_(result.reshape(out.shape))
    return out
