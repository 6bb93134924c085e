"""`KVSpec`: the frozen shape of paged KV (layers, heads, head size, tokens per block, dtype, device).

Layout is block-major: the pool tensor has shape
``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`` (index 0 of the ``2`` axis is K, 1 is V).
One block (all layers, K and V) is therefore one contiguous chunk, which a tier moves with a single copy,
and one layer's K (or V) of one block is a contiguous ``(block_size, num_kv_heads, head_dim)`` slab, which
a paged-attention kernel reads directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..types import KVDType

LAYOUT_VERSION = 1
"""Version of the block layout above; it is part of every block hash's namespace."""

KEY_INDEX = 0
VALUE_INDEX = 1

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = tuple(member.torch for member in KVDType)


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"KVSpec.{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class KVSpec:
    """Shape, dtype and device of the KV held in a block pool.

    `dtype` may be given as a `torch.dtype`, a `KVDType` or its name; `device` as a `torch.device` or a
    string. Both are normalised to `torch.dtype` / `torch.device` at construction. All sizes are positive.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype = torch.float16
    device: torch.device = torch.device("cpu")

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            _require_positive_int(name, getattr(self, name))
        try:
            dtype = KVDType.parse(self.dtype).torch
        except ValueError:
            valid = ", ".join(str(d) for d in SUPPORTED_DTYPES)
            raise ValueError(f"KVSpec.dtype={self.dtype!r} is not supported; expected one of: {valid}") from None
        if not isinstance(self.device, str | torch.device):
            raise ValueError(f"KVSpec.device={self.device!r} must be a torch.device or a device string")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"KVSpec.device={self.device!r} is not a valid device: {exc}") from None
        object.__setattr__(self, "dtype", dtype)  # normalising the given value, not deriving a new one
        object.__setattr__(self, "device", device)

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of one block: (num_layers, 2, block_size, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of a pool of `num_blocks` blocks."""
        return (num_blocks, *self.block_shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def elements_per_block(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim

    @property
    def bytes_per_block(self) -> int:
        return self.elements_per_block * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.itemsize
