"""What one forward of `PagedLlama` sees of the KV pool: where each layer's new keys and values are written,
and each layer's paged-attention view, built once per forward.

The pool is either a block-major tensor (num_blocks, num_layers, 2, block_size, heads, head_dim) in the model's
dtype, or a `QuantPool`: a quantized pool (N, num_layers, 2, slab_bytes) uint8 whose slabs a `PoolFormat`
describes, with full-precision STAGING blocks (num_staging, num_layers, 2, block_size, heads, head_dim) for the
tokens of blocks not sealed yet. In the second case a block-table entry e < N names sealed slab e and e >= N
staging block e - N (`kernels.PagedKV`); new tokens are always written into staging blocks (their slot is
``e * block_size + offset - N * block_size``), never into the quantized pool (the backend seals full staging
blocks into it with `KernelBackend.seal_blocks`).

`PoolViews` validates the batch's tables and lengths once (the backend's `prepare`: the reference kernels'
value checks, one host synchronisation; nothing for Triton) and then hands out per-layer views without
checking again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..compression.pool_formats import PoolFormat
from ..kernels import KernelBackend, PagedKV, QuantBlocks


@dataclass(frozen=True)
class QuantPool:
    """A quantized pool and its staging blocks (see the module docstring); both are used in place."""

    pool: Tensor
    staging: Tensor
    format: PoolFormat

    @property
    def num_sealed(self) -> int:
        """N: table entries below it name sealed slabs, the others staging blocks."""
        return int(self.pool.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.staging.shape[3])

    @property
    def device(self) -> torch.device:
        return self.staging.device

    @property
    def dtype(self) -> torch.dtype:
        return self.staging.dtype


Pool = Tensor | QuantPool


def block_size_of(pool: Pool) -> int:
    return pool.block_size if isinstance(pool, QuantPool) else int(pool.shape[3])


def slot_base(pool: Pool) -> int:
    """What to subtract from ``entry * block_size + offset`` to get the slot in the written caches."""
    return pool.num_sealed * pool.block_size if isinstance(pool, QuantPool) else 0


def write_caches(pool: Pool, layer: int) -> tuple[Tensor, Tensor]:
    """The caches layer `layer`'s new keys and values are written into (the staging blocks of a QuantPool)."""
    blocks = pool.staging if isinstance(pool, QuantPool) else pool
    return blocks[:, layer, 0], blocks[:, layer, 1]


class PoolViews:
    """One forward's views of `pool` for a batch (tables, lengths): each layer's write caches and its paged-
    attention view, sliced once per layer and validated once per forward (on the first `kv` call)."""

    def __init__(self, pool: Pool, backend: KernelBackend, tables: Tensor, seq_lens: Tensor,
                 max_seq_len: int | None = None) -> None:
        self.pool, self.backend = pool, backend
        self.tables, self.seq_lens, self.max_seq_len = tables, seq_lens, max_seq_len
        self._base: PagedKV | None = None
        self._layer = -1
        self._caches: tuple[Tensor, Tensor] | None = None

    def write(self, layer: int) -> tuple[Tensor, Tensor]:
        """Layer `layer`'s caches that new keys and values are written into."""
        if layer != self._layer or self._caches is None:
            self._layer, self._caches = layer, write_caches(self.pool, layer)
        return self._caches

    def kv(self, layer: int) -> PagedKV:
        """Layer `layer`'s paged-attention view."""
        pool, (keys, values) = self.pool, self.write(layer)
        quant = QuantBlocks(pool.format, pool.pool[:, layer, 0], pool.pool[:, layer, 1]) if isinstance(
            pool, QuantPool) else None
        if self._base is None:
            base = PagedKV(keys, values, self.tables, self.seq_lens, self.max_seq_len, quant)
            self._base = self.backend.prepare(base)
            return self._base
        return self._base.for_layer(keys, values, quant)
