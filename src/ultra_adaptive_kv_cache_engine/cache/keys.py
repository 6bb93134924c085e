"""Content names of tensors for the seed's generic store: a digest of dtype, shape and bytes."""

from __future__ import annotations

import hashlib

import torch


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of `tensor` (copied to contiguous CPU memory first when needed), any dtype."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def tensor_digest(tensor: torch.Tensor) -> bytes:
    """BLAKE2b-256 of (dtype, shape, bytes): deterministic across processes and machines."""
    h = hashlib.blake2b(digest_size=32, person=b"uakv-tensor-v1")
    h.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(tensor_bytes(tensor))
    return h.digest()


def entry_tokens(value: torch.Tensor) -> int:
    """Tokens an entry occupies: the sequence dimension (second to last) of (..., tokens, dim); 1 for 0-D/1-D."""
    return int(value.shape[-2]) if value.dim() >= 2 else 1
