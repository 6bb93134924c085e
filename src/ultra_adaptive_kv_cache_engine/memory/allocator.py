"""Allocators of the pool's backing tensor.

An allocator is any object with ``allocate(size) -> Tensor`` (a tensor of `size` elements) and
``deallocate(tensor) -> None``, like the seed's ``CustomMemoryAllocator``. `TorchAllocator` is the default.
The pool checks what an allocator returns (`check_allocation`) instead of trusting it.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class MemoryAllocator(Protocol):
    """What the block pool needs from an allocator."""

    def allocate(self, size: int) -> torch.Tensor: ...

    def deallocate(self, tensor: torch.Tensor) -> None: ...


class TorchAllocator:
    """Allocates zero-filled 1-D tensors on a fixed dtype and device.

    Zeros, not `torch.empty`: a kernel that reads a block's unused tail and masks it by multiplying with 0
    would turn uninitialised NaN bits into NaN outputs; one fill at start-up is cheap. Deallocation drops
    the reference; PyTorch's caching allocator reuses the memory.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device | str) -> None:
        self.dtype = dtype
        self.device = torch.device(device)

    def allocate(self, size: int) -> torch.Tensor:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size={size!r} must be a non-negative integer number of elements")
        return torch.zeros(size, dtype=self.dtype, device=self.device)

    def deallocate(self, tensor: torch.Tensor) -> None:
        del tensor  # the caller's reference is the last one; PyTorch frees or caches the memory

    def __repr__(self) -> str:
        return f"TorchAllocator(dtype={self.dtype}, device={self.device})"


def same_device(actual: torch.device, expected: torch.device) -> bool:
    """True if `actual` is `expected`; an expected device without an index matches any index of its type."""
    if actual.type != expected.type:
        return False
    return expected.index is None or actual.index == expected.index


def check_allocation(
    tensor: object, size: int, dtype: torch.dtype, device: torch.device, allocator: object
) -> torch.Tensor:
    """`tensor` if it is a contiguous tensor of `size` elements of `dtype` on `device`, else ValueError."""
    who = type(allocator).__name__
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{who}.allocate({size}) returned {type(tensor).__name__}; expected a torch.Tensor")
    if tensor.dtype != dtype:
        raise ValueError(f"{who}.allocate({size}) returned dtype {tensor.dtype}; the KV spec expects {dtype}")
    if not same_device(tensor.device, device):
        raise ValueError(f"{who}.allocate({size}) returned a tensor on {tensor.device}; the KV spec expects {device}")
    if tensor.numel() != size:
        raise ValueError(f"{who}.allocate({size}) returned {tensor.numel()} elements; expected exactly {size}")
    if not tensor.is_contiguous():
        raise ValueError(f"{who}.allocate({size}) returned a non-contiguous tensor; expected a contiguous one")
    return tensor
