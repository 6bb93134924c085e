"""Asymmetric 4-bit quantisation with a zero point per slice, KIVI-style (two values per byte).

KIVI quantises keys per channel and values per token; here one codec instance has one `axis`: pick the token
axis for keys (per channel) and the last axis for values (per token), or use one for both.
"""

from __future__ import annotations

import torch

from ..types import CodecKind
from . import quant
from .codec import TensorMeta

LEVELS = 15


class Int4Codec(quant.SliceCodec):
    """q = round((x - min) / s) in [0, 15], s = (max - min) / 15 per slice along `axis` (s = 1 if max == min).

    Payload: float32 minima, float32 scales, then the codes packed two per byte (low nibble first; a trailing
    odd code is padded with 0). Error bound: s / 2 = (max - min) / 30 <= absmax / 15 per slice.
    """

    kind = CodecKind.INT4
    lossless = False
    max_error = 1.0 / LEVELS

    def _quantize(self, x: torch.Tensor, axis: int) -> tuple[torch.Tensor, ...]:
        lo = x.amin(dim=axis, keepdim=True)
        scale = quant.nonzero_scale((x.amax(dim=axis, keepdim=True) - lo) / LEVELS)
        q = torch.round((x - lo) / scale).clamp_(0, LEVELS).to(torch.uint8).reshape(-1)
        if q.numel() % 2:
            q = torch.cat([q, q.new_zeros(1)])
        return lo, scale, q[0::2] | (q[1::2] << 4)

    def _dequantize(self, payload: bytes | memoryview, meta: TensorMeta, shape: tuple[int, ...], axis: int
                    ) -> torch.Tensor:
        n = quant.slice_count(shape, axis)
        lo_b, scale_b, codes_b = quant.split(payload, [4 * n, 4 * n, (meta.numel + 1) // 2])
        sshape = quant.scale_shape(shape, axis)
        lo, scale = quant.read_f32(lo_b, sshape), quant.read_f32(scale_b, sshape)
        packed = quant.read_u8(codes_b)
        q = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[: meta.numel].reshape(shape)
        return q.float() * scale + lo
