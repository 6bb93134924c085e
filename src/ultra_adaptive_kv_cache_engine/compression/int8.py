"""Symmetric int8 with one absmax scale per slice (per token: axis=-1; per channel: the token axis)."""

from __future__ import annotations

import torch

from ..types import CodecKind
from . import quant
from .codec import TensorMeta


class Int8Codec(quant.SliceCodec):
    """q = round(x / s) in [-127, 127], s = absmax / 127 over each slice along `axis` (s = 1 for all-zero slices).

    Payload: float32 scales (C order of the shape with `axis` set to 1), then the int8 values.
    Error bound: |x_hat - x| <= s / 2 = absmax / 254 per slice.
    """

    kind = CodecKind.INT8
    lossless = False
    max_error = 1.0 / 254.0

    def _quantize(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
        scale = quant.absmax_scale(x, axis, 127.0)
        return scale, torch.round(x / scale).clamp_(-127, 127).to(torch.int8)

    def _dequantize(self, payload: bytes | memoryview, meta: TensorMeta, shape: tuple[int, ...], axis: int
                    ) -> torch.Tensor:
        scale, q = quant.read_scaled(payload, meta, shape, axis, torch.int8)
        return q.float() * scale
