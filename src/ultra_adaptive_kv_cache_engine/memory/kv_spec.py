"""`KVSpec`: the frozen shape of paged KV (layers, heads, head size, tokens per block, dtype, device).

Layout is block-major: the pool tensor has shape
``(num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim)`` (index 0 of the ``2`` axis is K, 1 is V).
One block (all layers, K and V) is therefore one contiguous chunk, which a tier moves with a single copy,
and one layer's K (or V) of one block is a contiguous ``(block_size, num_kv_heads, head_dim)`` slab, which
a paged-attention kernel reads directly.

A quantized pool (`pool_format`, a name in `compression.pool_formats.POOL_FORMATS`) stores the same blocks as
uint8 slabs: ``(num_blocks, num_layers, 2, slab_bytes)``, one slab per layer and K/V (still one contiguous
chunk per block). `dtype` stays the compute (model) dtype; `storage_dtype`, `block_shape`, `pool_shape`,
`elements_per_block`, `bytes_per_block` and `bytes_per_token` describe what the pool STORES, so a memory
budget holds more blocks of a quantized pool. `staging_block_shape` is the full-precision layout of a block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compression.pool_formats import PoolFormat, get_pool_format
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
    pool_format: str | None = None  # None: blocks stored in `dtype`; else a pool format's name (quantized)

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
        if self.pool_format is not None:
            try:
                fmt = get_pool_format(self.pool_format)
            except ValueError as exc:
                raise ValueError(f"KVSpec.pool_format: {exc}") from None
            fmt.slab_bytes(self.block_size, self.num_kv_heads, self.head_dim)  # head_dim must pack

    @property
    def quant_format(self) -> PoolFormat | None:
        """The pool format of a quantized pool; None when blocks are stored in `dtype`."""
        return get_pool_format(self.pool_format) if self.pool_format is not None else None

    @property
    def storage_dtype(self) -> torch.dtype:
        """Element type of the pool tensor: uint8 for a quantized pool, else `dtype`."""
        return torch.uint8 if self.pool_format is not None else self.dtype

    @property
    def slab_bytes(self) -> int:
        """Bytes of one layer's K (or V) of one block in a quantized pool; ValueError for an unquantized one."""
        fmt = self.quant_format
        if fmt is None:
            raise ValueError("slab_bytes is defined for quantized pools only (pool_format is None)")
        return fmt.slab_bytes(self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def staging_block_shape(self) -> tuple[int, int, int, int, int]:
        """Full-precision shape of one block: (num_layers, 2, block_size, num_kv_heads, head_dim)."""
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_shape(self) -> tuple[int, ...]:
        """Shape of one stored block: (num_layers, 2, block_size, num_kv_heads, head_dim), or for a quantized
        pool (num_layers, 2, slab_bytes)."""
        if self.pool_format is not None:
            return (self.num_layers, 2, self.slab_bytes)
        return self.staging_block_shape

    def pool_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of a pool of `num_blocks` blocks."""
        return (num_blocks, *self.block_shape)

    @property
    def itemsize(self) -> int:
        """Bytes per stored element (1 for a quantized pool)."""
        return self.storage_dtype.itemsize

    @property
    def elements_per_block(self) -> int:
        """Stored elements of one block."""
        n = 1
        for d in self.block_shape:
            n *= d
        return n

    @property
    def bytes_per_block(self) -> int:
        return self.elements_per_block * self.itemsize

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V of one token over all layers (a quantized pool: its block's bytes per token,
        rounded up)."""
        return -(-self.bytes_per_block // self.block_size)
