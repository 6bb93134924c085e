"""Shared pieces of the quantising codecs: slice layout along one axis, scale packing, payload splitting.

A quantising codec reduces along one `axis` (the absmax or min/max is taken over it), so there is one scale per
slice: `numel // shape[axis]` scales, in C order of the shape with `axis` set to 1. Scales travel as float32.
"""

from __future__ import annotations

import torch

from .codec import CodecError, TensorMeta, bytes_to_tensor, uint8_view


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
