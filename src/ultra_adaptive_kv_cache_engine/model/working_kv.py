"""`WorkingKV`: contiguous copies of the running sequences' KV, so the CPU packed forward gathers nothing.

The reference paged attention copies every sequence's blocks out of the pool, layer by layer, at every step
(two `index_select` per sequence per layer) and attends sequence by sequence (one SDPA call each). Here the
running sequences' KV also lives in one working slab (rows, num_layers, 2, kv_heads, capacity, head_dim) in the
attention's compute dtype (float32; float64 for a float64 model), one row per sequence, each head's positions
contiguous. A forward (`WorkingBatch`) writes the new tokens' keys and values into the rows, attends every
single-token (decode) chunk in ONE masked SDPA call per layer over the slab's first rows, each multi-token
(prefill) chunk through the reference kernels' per-sequence attention (`attend_sequence`), and at its end copies
the new tokens' KV into their pool slots, all layers in one indexed copy per chunk.

Invariants: the pool stays the source of truth. Row r's first `valid` positions hold the pool's KV of its
sequence's positions; before a forward, the positions between `valid` and a chunk's first are filled from the
pool (the cached prefix at first use, or tokens a forward without the slab computed); a chunk's positions count
as valid once `flush` wrote them to the pool. The owner `drop`s a sequence whenever its KV changes other than by
a forward through the slab (closed, preempted, pressed). Rows are dense: a dropped row is refilled with the
last one (so the decode call reads rows 0 .. n-1 and no more). The slab is kept when no row is held (the next
sequences reuse it: allocating and zeroing it again cost more than a step); `release` gives it back.
Capacity doubles, rows grow by half, when they run out (amortised O(1) per token); the slab stays within `budget_bytes`: a batch that would need more gets None (nothing
changed) and the caller takes the paged path. Not for a quantized pool (sealed blocks are read dequantized
there): the pool is a block-major tensor (blocks, layers, 2, block_size, kv_heads, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels.reference_attention import attend_sequence, compute_dtype

_ALIGN = 64  # capacities are multiples of this many positions


@dataclass(frozen=True)
class WorkingChunk:
    """One sequence's new tokens in a packed forward: positions ``start .. end - 1``; `table` is its block table
    (block ids of the pool); `key` names the sequence (the owner's id)."""

    key: int
    start: int
    end: int
    table: list[int]


class WorkingKV:
    """The working slab and which sequence holds which row (see the module docstring)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 budget_bytes: int) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"budget_bytes={budget_bytes!r} must be a non-negative int")
        self.shape = (num_layers, 2, kv_heads, head_dim)
        self.dtype, self.device = compute_dtype(dtype), torch.device(device)
        self.budget_bytes = budget_bytes
        self._position_bytes = num_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=self.dtype).element_size()
        self.slab: Tensor | None = None  # (rows, layers, 2, kv_heads, capacity, head_dim)
        self._rows: dict[int, int] = {}  # key -> row
        self._keys: list[int] = []  # row -> key
        self._valid: dict[int, int] = {}  # key -> positions that hold the pool's KV

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def bytes_held(self) -> int:
        return 0 if self.slab is None else self.slab.numel() * self.slab.element_size()

    def row_of(self, key: int) -> int | None:
        return self._rows.get(key)

    def drop(self, key: int) -> None:
        """Forgets `key`'s row (nothing happens when it has none); the last row moves into it."""
        row = self._rows.pop(key, None)
        if row is None:
            return
        self._valid.pop(key)
        last = self._keys.pop()
        if last != key:
            assert self.slab is not None
            valid = self._valid[last]
            self.slab[row, :, :, :, :valid].copy_(self.slab[len(self._keys), :, :, :, :valid])
            self._keys[row], self._rows[last] = last, row

    def release(self) -> None:
        """Forgets every row and gives the slab's memory back."""
        self.slab = None
        self._rows, self._keys, self._valid = {}, [], {}

    def batch(self, pool: Tensor, chunks: list[WorkingChunk]) -> WorkingBatch | None:
        """The forward's view over `chunks` (in packed order), rows given, grown and filled up to each chunk's
        first position; None when the slab would go past `budget_bytes` (nothing is changed then)."""
        seen: set[int] = set()
        targets = [_pool_index(pool, c, seen) for c in chunks]  # validates before anything changes
        rows = len(self._keys) + len({c.key for c in chunks if c.key not in self._rows})
        longest = max((c.end for c in chunks), default=0)
        held_rows, held_cap = (0, 0) if self.slab is None else (int(self.slab.shape[0]), int(self.slab.shape[4]))
        new_rows = held_rows if rows <= held_rows else max(rows, held_rows + max(4, held_rows // 2))
        new_cap = held_cap if longest <= held_cap else -(-max(longest, 2 * held_cap) // _ALIGN) * _ALIGN
        if new_rows * new_cap * self._position_bytes > self.budget_bytes:
            return None
        if (new_rows, new_cap) != (held_rows, held_cap):
            self._grow(new_rows, new_cap)
        assert self.slab is not None
        spans: list[tuple[int, int, int, int]] = []  # (packed row, start, end, slab row)
        packed = 0
        for c in chunks:
            row = self._rows.get(c.key)
            if row is None:
                row = self._rows[c.key] = len(self._keys)
                self._keys.append(c.key)
                self._valid[c.key] = 0
            if self._valid[c.key] < c.start:
                _fill(self.slab[row], pool, c.table, self._valid[c.key], c.start)
            self._valid[c.key] = c.start  # the chunk's positions count once `flush` wrote them
            spans.append((packed, c.start, c.end, row))
            packed += c.end - c.start
        return WorkingBatch(self, pool, [c.key for c in chunks], spans, targets)

    def _grow(self, rows: int, capacity: int) -> None:
        layers, two, heads, dim = self.shape
        # every position holds a finite value (zeros or some KV): masked positions are read by the decode call
        slab = torch.empty((rows, layers, two, heads, capacity, dim), dtype=self.dtype, device=self.device)
        used = len(self._keys) if self.slab is not None else 0
        if used:
            assert self.slab is not None
            cap = min(capacity, int(self.slab.shape[4]))
            slab[:used, :, :, :, :cap].copy_(self.slab[:used, :, :, :, :cap])
            slab[:used, :, :, :, cap:].zero_()
        slab[used:].zero_()
        self.slab = slab

    def computed(self, key: int, end: int) -> None:
        """`key`'s first `end` positions hold the pool's KV now (a forward flushed them)."""
        if key in self._valid and self._valid[key] < end:
            self._valid[key] = end


def _fill(row: Tensor, pool: Tensor, table: list[int], start: int, end: int) -> None:
    """Copies the pool's KV of positions ``start .. end - 1`` (all layers) into ``row[:, :, :, start:end]``."""
    block_size = int(pool.shape[3])
    first, last = start // block_size, -(-end // block_size)
    ids = torch.tensor(table[first:last], dtype=torch.int64, device=pool.device)
    blocks = pool.index_select(0, ids)  # (n, layers, 2, block_size, heads, dim)
    positions = blocks.permute(1, 2, 4, 0, 3, 5).flatten(3, 4)  # (layers, 2, heads, n * block_size, dim)
    offset = first * block_size
    row[:, :, :, start:end].copy_(positions[:, :, :, start - offset : end - offset])


def _pool_index(pool: Tensor, chunk: WorkingChunk, seen: set[int]) -> tuple[Tensor, Tensor]:
    """The pool blocks and offsets of the chunk's positions; ValueError for a block id outside the pool or a
    slot that another chunk of the batch writes too (`seen`: the pool slots taken so far)."""
    block_size, num_blocks = int(pool.shape[3]), int(pool.shape[0])
    if not 0 <= chunk.start < chunk.end <= len(chunk.table) * block_size:
        raise ValueError(f"sequence {chunk.key}: positions {chunk.start}..{chunk.end - 1} with a "
                         f"{len(chunk.table)}-block table")
    used = chunk.table[chunk.start // block_size : -(-chunk.end // block_size)]
    bad = next((b for b in used if not 0 <= b < num_blocks), None)
    if bad is not None:
        raise ValueError(f"block id {bad} of sequence {chunk.key} is not a block of the pool [0, {num_blocks})")
    blocks = [chunk.table[p // block_size] for p in range(chunk.start, chunk.end)]
    offsets = [p % block_size for p in range(chunk.start, chunk.end)]
    taken = len(seen)
    seen.update(b * block_size + o for b, o in zip(blocks, offsets, strict=True))
    if len(seen) != taken + len(blocks):
        raise ValueError(f"sequence {chunk.key} writes a pool slot that another sequence of the batch writes too")
    return (torch.tensor(blocks, dtype=torch.int64, device=pool.device),
            torch.tensor(offsets, dtype=torch.int64, device=pool.device))


class WorkingBatch:
    """One packed forward over the slab: `store(layer, k, v)` writes a layer's new KV into it, `attend(layer, q,
    scale)` attends every chunk over its row, `flush()` writes the new KV into the pool."""

    def __init__(self, owner: WorkingKV, pool: Tensor, keys: list[int], spans: list[tuple[int, int, int, int]],
                 targets: list[tuple[Tensor, Tensor]]) -> None:
        assert owner.slab is not None
        self.slab, self.pool = owner.slab, pool
        self._owner, self._keys, self.spans, self._targets = owner, keys, spans, targets
        self._prefills = [s for s in spans if s[2] - s[1] > 1]
        decodes = [s for s in spans if s[2] - s[1] == 1]
        # (rows, positions, layers, 2, kv_heads, head_dim): the decode tokens' slots are one indexed write a layer
        self._by_position = self.slab.permute(0, 4, 1, 2, 3, 5)
        self._decode: tuple[Tensor, Tensor, Tensor, Tensor, int, bool] | None = None
        if decodes:  # rows 0 .. last decoding row; a row that does not decode here attends to position 0 alone
            used = max(s[3] for s in decodes) + 1
            lengths = torch.ones(used, dtype=torch.int64)
            lengths[[s[3] for s in decodes]] = torch.tensor([s[2] for s in decodes])
            width = int(lengths.max())
            mask = torch.arange(width)[None, :] < lengths[:, None]
            device = pool.device
            packed = torch.tensor([s[0] for s in decodes], device=device)
            rows = torch.tensor([s[3] for s in decodes], device=device)
            positions = torch.tensor([s[1] for s in decodes], device=device)
            dense = [(s[0], s[3]) for s in decodes] == [(i, i) for i in range(len(decodes))] and used == len(spans)
            self._decode = (packed, rows, positions, mask[:, None, None, :].to(device), width, dense)
        self._layer_index = torch.zeros(len(decodes), dtype=torch.int64, device=pool.device)

    def store(self, layer: int, key: Tensor, value: Tensor) -> None:
        """Writes layer `layer`'s new keys and values (total, kv_heads, head_dim) into the slab rows."""
        slab = self.slab
        for packed, start, end, row in self._prefills:
            rows = slice(packed, packed + end - start)
            slab[row, layer, 0, :, start:end].copy_(key[rows].transpose(0, 1))
            slab[row, layer, 1, :, start:end].copy_(value[rows].transpose(0, 1))
        if self._decode is not None:
            packed_rows, slab_rows, positions, _, _, dense = self._decode
            kv = torch.stack((key, value), 1) if dense else torch.stack(
                (key.index_select(0, packed_rows), value.index_select(0, packed_rows)), 1)
            self._by_position.index_put_((slab_rows, positions, self._layer_index.fill_(layer)), kv)

    def attend(self, layer: int, query: Tensor, scale: float) -> Tensor:
        """Each chunk's new queries (total, q_heads, head_dim) over its row's first `end` positions, causal among
        the new; returns query's shape and dtype."""
        slab = self.slab
        out = torch.empty(query.shape, dtype=slab.dtype, device=query.device)
        for packed, start, end, row in self._prefills:
            rows = slice(packed, packed + end - start)
            keys, values = slab[row, layer, 0, :, :end][None], slab[row, layer, 1, :, :end][None]
            out[rows] = attend_sequence(query[rows].to(slab.dtype), keys, values, scale)
        if self._decode is not None:
            packed_rows, slab_rows, _, mask, width, dense = self._decode
            used, heads, dim = int(mask.shape[0]), int(slab.shape[3]), int(slab.shape[5])
            shape = (used, heads, query.shape[1] // heads, dim)
            keys, values = slab[:used, layer, 0, :, :width], slab[:used, layer, 1, :, :width]
            if dense:  # packed row i is slab row i, every one decoding: no scatter, no gather
                q = query.to(slab.dtype).reshape(shape)
                return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale).reshape(
                    query.shape).to(query.dtype)
            q = torch.zeros(shape, dtype=slab.dtype, device=query.device)
            q[slab_rows] = query.index_select(0, packed_rows).to(slab.dtype).view(-1, *shape[1:])
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
            out[packed_rows] = o.index_select(0, slab_rows).view(-1, *query.shape[1:])
        return out.to(query.dtype)

    def flush(self) -> None:
        """Copies every chunk's new KV (all layers) from the slab into its pool slots."""
        by_slot = self.pool.permute(0, 3, 1, 2, 4, 5)  # (blocks, offsets, layers, 2, kv_heads, head_dim)
        for (_, start, end, row), (blocks, offsets) in zip(self.spans, self._targets, strict=True):
            by_slot[blocks, offsets] = self._by_position[row, start:end].to(self.pool.dtype)
        for key, (_, _, end, _) in zip(self._keys, self.spans, strict=True):
            self._owner.computed(key, end)
