"""Content names of tensors for the seed's generic store: a digest of dtype, shape and bytes.

Hot path: one `numpy()` view of a CPU tensor (no copy when contiguous), one BLAKE2b update over its bytes.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

import numpy as np
import torch

MAX_KEY_BYTES = 256 << 20
"""A key tensor is named by hashing all its bytes; a key larger than this (counted as numel * element size,
so an `expand`ed view of a few bytes counts in full) is refused rather than copied and hashed."""

STORABLE_DTYPES = frozenset({
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
    torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float8_e4m3fn,
    torch.float8_e5m2,
})
"""Dtypes a stored value may have: what a safetensors snapshot holds (no quantized, complex or sparse)."""

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


def check_key_tensor(tensor: torch.Tensor) -> None:
    """ValueError unless `tensor` can be named: a dense tensor of a storable dtype, at most MAX_KEY_BYTES."""
    if tensor.layout is not torch.strided or tensor.dtype not in STORABLE_DTYPES:
        raise ValueError(f"key of dtype {tensor.dtype} and layout {tensor.layout} cannot be hashed; expected a dense "
                         "tensor of a plain dtype (bool, integer or floating point)")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes > MAX_KEY_BYTES:
        raise ValueError(f"key of shape {tuple(tensor.shape)} is {nbytes} bytes (numel * element size, broadcast "
                         f"views counted in full); keys are at most {MAX_KEY_BYTES} bytes")


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """BLAKE2b-256 of (dtype, shape, bytes): deterministic across processes and machines. ValueError for a key
    `check_key_tensor` refuses (before any copy)."""
    check_key_tensor(tensor)
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


def entry_bytes(value: torch.Tensor) -> int:
    """Bytes an entry's stored copy occupies (its clone is dense: numel * element size)."""
    return int(value.numel()) * value.element_size()


def entry_tokens(value: torch.Tensor) -> int:
    """Tokens an entry occupies: the sequence dimension (second to last) of (..., tokens, dim); 1 for 0-D/1-D."""
    return int(value.shape[-2]) if value.dim() >= 2 else 1
