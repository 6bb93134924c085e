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
``t % block_size``; those block ids are in [0, num_table_entries); entries past
``ceil(seq_lens[b] / block_size)`` are never read and may hold anything.

Quantized pools (`quant`, a `QuantBlocks`): the pool is uint8 (num_blocks, num_layers, 2, slab_bytes) whose
slabs a `PoolFormat` describes, and the tokens of blocks not sealed yet live in full-precision STAGING blocks
(num_staging, num_layers, 2, block_size, heads, head_dim), the layout of an unquantized pool. Then key_cache /
value_cache are the staging views of the layer, and a block-table entry e < N (N = quant.num_blocks) is slab e
of the quantized pool, e >= N staging block e - N. Without `quant` nothing changes.

`checked()` runs the value checks once (one host synchronisation) and returns the view with `checked_lens`
set; `for_layer` gives the view of another layer of the same pools without checking anything again, so a
forward validates once, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..compression.pool_formats import PoolFormat
from .checks import (
    INDEX_DTYPES,
    KV_DTYPES,
    require_dtype,
    require_like,
    require_shape,
    require_tensor,
    require_unit_last_stride,
)
from .launch_plan import DecodeShape


@dataclass(frozen=True)
class QuantBlocks:
    """One layer's sealed (quantized) blocks: key and value slabs (N, slab_bytes) uint8 of `format`."""

    format: PoolFormat
    key_slabs: Tensor
    value_slabs: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.format, PoolFormat):
            raise TypeError(f"format={self.format!r} must be a PoolFormat")
        keys = require_tensor("key_slabs", self.key_slabs, 2)
        values = require_tensor("value_slabs", self.value_slabs, 2)
        require_dtype("key_slabs", keys, (torch.uint8,))
        require_like("value_slabs", values, "key_slabs", keys)
        require_shape("value_slabs", values, tuple(keys.shape))
        require_unit_last_stride("key_slabs", keys)
        require_unit_last_stride("value_slabs", values)

    @property
    def num_blocks(self) -> int:
        return int(self.key_slabs.shape[0])

    @property
    def slab_bytes(self) -> int:
        return int(self.key_slabs.shape[1])


@dataclass(frozen=True)
class PagedKV:
    """The paged keys and values of one layer for a batch of sequences (see the module docstring)."""

    key_cache: Tensor
    value_cache: Tensor
    block_tables: Tensor
    seq_lens: Tensor
    max_seq_len: int | None = None  # a host-side upper bound on seq_lens; None: max_blocks * block_size
    quant: QuantBlocks | None = None  # sealed blocks of a quantized pool; key/value_cache are then staging
    checked_lens: tuple[int, ...] | None = None  # seq_lens on the host, value-checked (`checked()`)

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
        if self.quant is not None:
            self._check_quant(key)

    def _check_quant(self, staging: Tensor) -> None:
        quant = self.quant
        if not isinstance(quant, QuantBlocks):
            raise TypeError(f"quant must be a QuantBlocks or None, got {type(quant).__name__}")
        require_like("quant.key_slabs", quant.key_slabs, "key_cache", staging, same_dtype=False)
        expected = quant.format.slab_bytes(self.block_size, self.num_kv_heads, self.head_dim)
        if quant.slab_bytes != expected:
            raise ValueError(
                f"quant slabs have {quant.slab_bytes} bytes; pool format {quant.format.name!r} stores a block of "
                f"{self.block_size} tokens x {self.num_kv_heads} heads x {self.head_dim} in {expected}"
            )

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

    @classmethod
    def from_pools(
        cls, pool: Tensor, staging: Tensor, layer: int, block_tables: Tensor, seq_lens: Tensor, format: PoolFormat,
        max_seq_len: int | None = None,
    ) -> PagedKV:
        """The view of `layer` of a quantized pool (N, num_layers, 2, slab_bytes) uint8 and its staging blocks
        (num_staging, num_layers, 2, block_size, heads, head_dim): table entries >= N name staging blocks."""
        require_tensor("pool", pool, 4)
        require_tensor("staging", staging, 6)
        if pool.shape[2] != 2 or staging.shape[2] != 2 or pool.shape[1] != staging.shape[1]:
            raise ValueError(f"pool {tuple(pool.shape)} and staging {tuple(staging.shape)} must be (blocks, layers, "
                             "2, ...) with the same number of layers")
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < pool.shape[1]:
            raise ValueError(f"layer={layer!r} must be an int in [0, {pool.shape[1]})")
        quant = QuantBlocks(format, pool[:, layer, 0], pool[:, layer, 1])
        return cls(staging[:, layer, 0], staging[:, layer, 1], block_tables, seq_lens, max_seq_len, quant)

    def for_layer(self, key_cache: Tensor, value_cache: Tensor, quant: QuantBlocks | None = None) -> PagedKV:
        """This view with another layer's caches (and slabs) of the same pools: nothing is checked again, so
        they must have this view's shapes, dtypes and device (another layer of the same pool does)."""
        view = object.__new__(PagedKV)  # no __init__: nothing to check again (a few microseconds per layer)
        view.__dict__.update(self.__dict__, key_cache=key_cache, value_cache=value_cache, quant=quant)
        return view

    def checked(self) -> PagedKV:
        """This view after the value checks (one host synchronisation): every length in [1, max_blocks *
        block_size] and every table entry covering a live position in [0, num_table_entries); ValueError
        naming the first bad one. The result carries the lengths on the host (`checked_lens`)."""
        lens = [int(n) for n in self.seq_lens.tolist()]
        bound = int(self.block_tables.shape[1]) * self.block_size
        for b, n in enumerate(lens):
            if not 1 <= n <= bound:
                raise ValueError(f"seq_lens[{b}]={n} must be in [1, {bound}] (max_blocks_per_seq * block_size)")
        if lens:
            self._check_entries(max(lens))
        view = object.__new__(PagedKV)
        view.__dict__.update(self.__dict__, checked_lens=tuple(lens))
        return view

    def _check_entries(self, longest: int) -> None:
        bs, limit = self.block_size, self.num_table_entries
        width = -(-longest // bs)
        tables = self.block_tables[:, :width].long()
        used = torch.arange(width, device=tables.device)[None, :] * bs < self.seq_lens[:, None].long()
        bad = used & ((tables < 0) | (tables >= limit))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0].tolist())
            raise ValueError(f"block_tables[{b}, {i}]={int(tables[b, i])} is not a block id in [0, {limit})")

    @property
    def batch_size(self) -> int:
        return int(self.block_tables.shape[0])

    @property
    def num_blocks(self) -> int:
        """Blocks of key_cache (the staging blocks when `quant` is set)."""
        return int(self.key_cache.shape[0])

    @property
    def num_table_entries(self) -> int:
        """Valid block-table entries: num_blocks, plus the sealed blocks of `quant` (which come first)."""
        return self.num_blocks + (self.quant.num_blocks if self.quant is not None else 0)

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
