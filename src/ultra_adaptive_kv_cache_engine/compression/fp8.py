"""fp8 (float8_e4m3fn) with one absmax scale per slice, so each slice uses the format's full range."""

from __future__ import annotations

import torch

from ..types import CodecKind
from . import quant
from .codec import TensorMeta

E4M3_MAX = 448.0


class Fp8Codec(quant.SliceCodec):
    """v = x / s cast to float8_e4m3fn (round to nearest), s = absmax / 448 per slice along `axis`.

    Payload: float32 scales, then one byte per element. Error bound: e4m3 keeps 3 mantissa bits, so each
    element is within 2**-4 of itself (and so of the slice absmax); values far below the absmax lose more
    relative precision (subnormals) but never more than 2**-4 * absmax.
    """

    kind = CodecKind.FP8
    lossless = False
    max_error = 2.0**-4

    def _quantize(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
        scale = quant.absmax_scale(x, axis, E4M3_MAX)
        return scale, (x / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)

    def _dequantize(self, payload: bytes | memoryview, meta: TensorMeta, shape: tuple[int, ...], axis: int
                    ) -> torch.Tensor:
        scale, v = quant.read_scaled(payload, meta, shape, axis, torch.float8_e4m3fn)
        return v.float() * scale
