"""Content names of tensors for the seed's generic store: a digest of dtype, shape and bytes.

Hot path: one `numpy()` view of a CPU tensor (no copy when contiguous), one BLAKE2b update over its bytes.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

# dtypes numpy cannot hold are hashed through a same-width integer view of their bytes.
_SAME_WIDTH_INT = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}


def tensor_array(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view (a copy only when the tensor is not contiguous or not on the CPU) of `tensor`'s bytes."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    view = _SAME_WIDTH_INT.get(t.dtype)
    if view is not None:
        t = t.view(view)
    return t.numpy()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of `tensor`, any dtype."""
    return memoryview(np.ascontiguousarray(tensor_array(tensor)).reshape(-1).view(np.uint8))


@lru_cache(maxsize=1024)
def _header(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    return f"{dtype}|{shape}|".encode()


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """BLAKE2b-256 of (dtype, shape, bytes): deterministic across processes and machines."""
    h = hashlib.blake2b(_header(tensor.dtype, tuple(tensor.shape)), digest_size=32, person=b"uakv-tensor-v1")
    h.update(np.ascontiguousarray(tensor_array(tensor)).reshape(-1).view(np.uint8))
    return h.digest()


def all_finite(tensor: torch.Tensor) -> bool:
    """True unless a floating tensor holds NaN or Inf (numpy on CPU: one pass, no torch dispatch)."""
    if not tensor.is_floating_point():
        return True
    if tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64, torch.float16):
        return bool(np.isfinite(tensor_array(tensor)).all())
    return bool(torch.isfinite(tensor).all())


def entry_tokens(value: torch.Tensor) -> int:
    """Tokens an entry occupies: the sequence dimension (second to last) of (..., tokens, dim); 1 for 0-D/1-D."""
    return int(value.shape[-2]) if value.dim() >= 2 else 1
