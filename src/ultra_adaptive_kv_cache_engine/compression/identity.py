"""The identity codec: the tensor's raw bytes, unchanged. Lossless for every storable dtype."""

from __future__ import annotations

import torch

from ..types import CodecKind
from .codec import Codec, EncodedTensor, TensorMeta, bytes_to_tensor, dtype_name, tensor_to_bytes


class IdentityCodec(Codec):
    """Payload = the raw little-endian bytes of the tensor in C order (bfloat16 and fp8 via a uint8 view)."""

    kind = CodecKind.IDENTITY

    def encode(self, tensor: torch.Tensor) -> EncodedTensor:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"identity codec expects a torch.Tensor, got {type(tensor).__name__}")
        dtype_name(tensor.dtype)
        return EncodedTensor(self._meta(tensor), tensor_to_bytes(tensor))

    def decode(self, payload: bytes | memoryview, meta: TensorMeta, out: torch.Tensor | None = None) -> torch.Tensor:
        self._check_meta(meta)
        return bytes_to_tensor(payload, meta.torch_dtype, meta.shape, out)
