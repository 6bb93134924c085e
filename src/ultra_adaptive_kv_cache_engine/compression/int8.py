"""Symmetric int8 with one absmax scale per slice (per token: axis=-1; per channel: the token axis)."""

from __future__ import annotations

import torch

from ..types import CodecKind
from . import quant
from .codec import Codec, EncodedTensor, TensorMeta, check_float


class Int8Codec(Codec):
    """q = round(x / s) in [-127, 127], s = absmax / 127 over each slice along `axis` (s = 1 for all-zero slices).

    Payload: float32 scales (C order of the shape with `axis` set to 1), then the int8 values.
    Error bound: |x_hat - x| <= s / 2 = absmax / 254 per slice.
    """

    kind = CodecKind.INT8
    lossless = False
    max_error = 1.0 / 254.0

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis={axis!r} must be an integer")
        self.axis = axis

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        x = quant.as_work(check_float(tensor, "int8"))
        axis = quant.normalize_axis(self.axis, x.dim())
        if x.numel() == 0:
            return EncodedTensor(self._meta(tensor, axis=axis), b"")
        scale = x.abs().amax(dim=axis, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return EncodedTensor(self._meta(tensor, axis=axis), quant.join(scale, q))

    def decode(self, payload: bytes | memoryview, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_meta(meta)
        shape = quant.work_shape(meta)
        axis = quant.meta_axis(meta)
        if meta.numel == 0:
            quant.split(payload, [0])
            return quant.finish(torch.empty(shape), meta, out)
        n_scales = quant.slice_count(shape, axis)
        scales_b, values_b = quant.split(payload, [4 * n_scales, meta.numel])
        scale = quant.read_f32(scales_b, quant.scale_shape(shape, axis))
        q = quant.read_u8(values_b).view(torch.int8).reshape(shape)
        return quant.finish(q.float() * scale, meta, out)
