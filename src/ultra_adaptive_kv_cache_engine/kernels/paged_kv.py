"""`PagedKV`: one layer's view of the block-major KV pool, with the block tables and lengths of a batch.

The pool (see `memory.kv_spec.KVSpec`) has shape (num_blocks, num_layers, 2, block_size, num_kv_heads,
head_dim); layer `l`'s keys are the strided view ``pool[:, l, 0]`` and its values ``pool[:, l, 1]``, each of
shape (num_blocks, block_size, num_kv_heads, head_dim), where one block's slab of one layer is contiguous.

Invariants checked at construction (metadata only, no device synchronisation):
- key_cache and value_cache have the same shape, dtype and device, and a contiguous last dimension;
- block_tables is (batch, max_blocks_per_seq) int32/int64 and seq_lens is (batch,) int32/int64, on the
  cache's device;
- max_seq_len, when given, is an int in [0, max_blocks_per_seq * block_size].
Invariants the caller keeps (the reference kernels check them, the fast kernels trust them): token t of
sequence b (0 <= t < seq_lens[b]) lives in block ``block_tables[b, t // block_size]`` at offset
``t % block_size``; those block ids are in [0, num_blocks); entries past ``ceil(seq_lens[b] / block_size)``
are never read and may hold anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .checks import (
    INDEX_DTYPES,
    KV_DTYPES,
    require_dtype,
    require_like,
    require_tensor,
    require_unit_last_stride,
)
from .launch_plan import DecodeShape


@dataclass(frozen=True)
class PagedKV:
    """The paged keys and values of one layer for a batch of sequences (see the module docstring)."""

    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    max_seq_len: int | None = None  # a host-side upper bound on seq_lens; None: max_blocks * block_size

    def __post_init__(self) -> None:
        key = require_tensor("key_cache", self.key_cache, 4)
        value = require_tensor("value_cache", self.value_cache, 4)
        require_dtype("key_cache", key, KV_DTYPES)
        require_like("value_cache", value, "key_cache", key)
        if value.shape != key.shape:
            raise ValueError(
                f"value_cache has shape {tuple(value.shape)} but key_cache has {tuple(key.shape)}; expected equal"
            )
        require_unit_last_stride("key_cache", key)
        require_unit_last_stride("value_cache", value)
        tables = require_tensor("block_tables", self.block_tables, 2)
        lens = require_tensor("seq_lens", self.seq_lens, 1)
        require_dtype("block_tables", tables, INDEX_DTYPES)
        require_dtype("seq_lens", lens, INDEX_DTYPES)
        require_like("block_tables", tables, "key_cache", key, same_dtype=False)
        require_like("seq_lens", lens, "key_cache", key, same_dtype=False)
        if lens.shape[0] != tables.shape[0]:
            raise ValueError(
                f"seq_lens has {lens.shape[0]} entries but block_tables has {tables.shape[0]} rows; expected equal"
            )
        bound = tables.shape[1] * key.shape[1]
        if self.max_seq_len is not None and (
            isinstance(self.max_seq_len, bool)
            or not isinstance(self.max_seq_len, int)
            or not 0 <= self.max_seq_len <= bound
        ):
            raise ValueError(f"max_seq_len={self.max_seq_len!r} must be an int in [0, {bound}] or None")

    @classmethod
    def from_pool(
        cls, pool: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor, max_seq_len: int | None = None
    ) -> PagedKV:
        """The view of `layer` of a block-major pool (num_blocks, num_layers, 2, block_size, heads, head_dim)."""
        require_tensor("pool", pool, 6)
        if pool.shape[2] != 2:
            raise ValueError(f"pool has shape {tuple(pool.shape)}; expected dimension 2 to be 2 (keys, values)")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < pool.shape[1]:
            raise ValueError(f"layer={layer!r} must be an int in [0, {pool.shape[1]})")
        return cls(pool[:, layer, 0], pool[:, layer, 1], block_tables, seq_lens, max_seq_len)

    @property
    def batch_size(self) -> int:
        return int(self.block_tables.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.key_cache.shape[0])

    @property
    def block_size(self) -> int:
        return int(self.key_cache.shape[1])

    @property
    def num_kv_heads(self) -> int:
        return int(self.key_cache.shape[2])

    @property
    def head_dim(self) -> int:
        return int(self.key_cache.shape[3])

    @property
    def dtype(self) -> torch.dtype:
        return self.key_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.key_cache.device

    @property
    def max_len_bound(self) -> int:
        """A host-side upper bound on every sequence length, known without reading seq_lens."""
        if self.max_seq_len is not None:
            return self.max_seq_len
        return int(self.block_tables.shape[1]) * self.block_size

    def decode_shape(self, query: Tensor) -> DecodeShape:
        """What the decode launch planner sees of a decode of `query` (batch, num_q_heads, head_dim) over this
        cache: sizes only (`check_query` validates the query)."""
        return DecodeShape(
            int(query.shape[0]), self.num_kv_heads, int(query.shape[-2]) // self.num_kv_heads, self.head_dim,
            self.max_len_bound, query.element_size(), self.block_size,
        )

    def check_query(self, query: Tensor, name: str = "query") -> int:
        """Check `query` (..., num_q_heads, head_dim) against this cache; returns the GQA group size."""
        require_like(name, query, "key_cache", self.key_cache)
        heads, dim = int(query.shape[-2]), int(query.shape[-1])
        if dim != self.head_dim:
            raise ValueError(f"{name} has head_dim {dim} but the cache has {self.head_dim}; expected equal")
        if heads == 0 or heads % self.num_kv_heads:
            raise ValueError(
                f"{name} has {heads} heads; expected a positive multiple of num_kv_heads={self.num_kv_heads}"
            )
        return heads // self.num_kv_heads
