"""fp8 (float8_e4m3fn) with one absmax scale per slice, so each slice uses the format's full range."""

from __future__ import annotations

import torch

from ..types import CodecKind
from . import quant
from .codec import Codec, EncodedTensor, TensorMeta, check_float

E4M3_MAX = 448.0


class Fp8Codec(Codec):
    """v = x / s cast to float8_e4m3fn (round to nearest), s = absmax / 448 per slice along `axis`.

    Payload: float32 scales, then one byte per element. Error bound: e4m3 keeps 3 mantissa bits, so each
    element is within 2**-4 of itself (and so of the slice absmax); values far below the absmax lose more
    relative precision (subnormals) but never more than 2**-4 * absmax.
    """

    kind = CodecKind.FP8
    lossless = False
    max_error = 2.0**-4

    def __init__(self, axis: int = -1) -> None:
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis={axis!r} must be an integer")
        self.axis = axis

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        x = quant.as_work(check_float(tensor, "fp8"))
        axis = quant.normalize_axis(self.axis, x.dim())
        if x.numel() == 0:
            return EncodedTensor(self._meta(tensor, axis=axis), b"")
        scale = x.abs().amax(dim=axis, keepdim=True) / E4M3_MAX
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        v = (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        return EncodedTensor(self._meta(tensor, axis=axis), quant.join(scale, v))

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
        v = quant.read_u8(values_b).view(torch.float8_e4m3fn).reshape(shape)
        return quant.finish(v.float() * scale, meta, out)
