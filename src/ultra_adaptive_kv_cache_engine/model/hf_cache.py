"""`PagedHFCache`: a `transformers.Cache` for ONE `generate` call, backed by a `KVCacheManager`.

Life cycle (the context manager form releases the pool references even on error)::

    with PagedHFCache(paged, input_ids, attention_mask) as cache:      # 1. lookup + pin cached prefixes
        out = model.generate(input_ids, attention_mask=attention_mask, cache=cache)   # 2. prefill the rest
        cache.commit(out)                                                # 3. write back + index full blocks
                                                                         # 4. exit: free the sequences

1. Each row's real tokens (left padding removed) open a sequence in the paged cache, which pins the longest
   cached prefix in full blocks. The batch restarts at column ``past_length = min_i(pad_i + cached_i)``,
   capped at ``L - 1`` so at least one prompt token is always computed (its logits give the first new token).
2. transformers sees a cache whose `get_seq_length()` is `past_length` and, given the FULL `input_ids`,
   prefills only ``input_ids[:, past_length:]`` (positions come from the attention mask). Each layer's
   prefix is copied from the pool into a contiguous working buffer at its first forward (`WorkingLayer`).
3. `commit(output_ids)` appends the KV of every new FULL block of each row to its sequence and enters it in
   the prefix index (if the pool lacks free blocks, as many as fit are kept and the rest is skipped).
4. `release()` frees the sequences (blocks stay cached, reusable until the pool reuses their slots).

Batches: left padding only (``padding_side='left'``, as transformers requires for decoder-only generation);
rows reuse different prefixes. Right padding or holes in the mask raise ValueError. Beam search is not
supported by `commit` (the batch must be the one given).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from transformers.cache_utils import Cache

from ..cache.manager import KVCacheManager
from ..memory import OutOfBlocksError
from ..metrics import LOGGER_NAME
from .batch import as_batch, row_offsets
from .working_layer import WorkingLayer

logger = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class RowPlan:
    """One batch row: `offset` leading pad columns, then `tokens` (the real prompt tokens)."""

    offset: int
    tokens: tuple[int, ...]
    seq_id: int
    pool_cached: int  # leading tokens whose KV the pool holds (a multiple of block_size)


class PagedHFCache(Cache):
    """A transformers cache for one `generate` call over `paged`; see the module docstring.

    `max_new_tokens` only sizes the working buffers up front (they grow if needed).
    """

    def __init__(
        self,
        paged: KVCacheManager,
        input_ids: torch.Tensor | list[int] | list[list[int]],
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 0,
    ) -> None:
        if not isinstance(paged, KVCacheManager):
            raise TypeError(f"paged must be a KVCacheManager, got {type(paged).__name__}")
        self.paged = paged
        self.input_ids, self.attention_mask = as_batch(input_ids, attention_mask)
        self.rows: tuple[RowPlan, ...] = self._open_rows()
        width = self.input_ids.shape[1]
        self.past_length = min(min(r.offset + r.pool_cached for r in self.rows), width - 1)
        self._released = False
        layers = [
            WorkingLayer(self.past_length, width + max_new_tokens, self._loader(layer))
            for layer in range(paged.spec.num_layers)
        ]
        super().__init__(layers=layers)

    def _open_rows(self) -> tuple[RowPlan, ...]:
        rows: list[RowPlan] = []
        try:
            for index, offset in enumerate(row_offsets(self.attention_mask)):
                tokens = tuple(self.input_ids[index, offset:].tolist())
                seq_id = self.paged.new_sequence(tokens)
                rows.append(RowPlan(offset, tokens, seq_id, self.paged.num_cached_tokens(seq_id)))
        except BaseException:
            for row in rows:
                self.paged.free(row.seq_id)
            raise
        return tuple(rows)

    # -- what generate reads --------------------------------------------------------------------------
    @property
    def row_cached_tokens(self) -> tuple[int, ...]:
        """Per row, the prompt tokens whose KV is loaded instead of computed."""
        return tuple(max(0, self.past_length - row.offset) for row in self.rows)

    def _loader(self, layer: int) -> Any:
        def load(keys: torch.Tensor, values: torch.Tensor) -> None:
            self._load_prefix(layer, keys, values)

        return load

    def _load_prefix(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fills positions ``[0, past_length)`` of one layer's buffers from the pool (pads stay zero)."""
        spec = self.paged.spec
        if keys.shape[0] != len(self.rows) or (keys.shape[1], keys.shape[3]) != (spec.num_kv_heads, spec.head_dim):
            raise ValueError(
                f"model KV of shape (batch, heads, _, dim) = {tuple(keys.shape)} does not fit the paged cache "
                f"(batch {len(self.rows)}, {spec.num_kv_heads} KV heads, head_dim {spec.head_dim})"
            )
        for index, (row, used) in enumerate(zip(self.rows, self.row_cached_tokens, strict=True)):
            if used:
                k, v = self.paged.read_layer(row.seq_id, layer)
                keys[index, :, row.offset :].copy_(k[:, :used])
                values[index, :, row.offset :].copy_(v[:, :used])

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"layer_idx={layer_idx} is out of range: the paged cache spec has {len(self.layers)} layers"
            )
        if self._released:
            raise RuntimeError("this PagedHFCache was released; create one per generate call")
        return self.layers[layer_idx].update(key_states, value_states)

    # -- after generate -------------------------------------------------------------------------------
    def commit(self, output: torch.Tensor | Any) -> int:
        """Writes the KV of every new full block of each row back to the pool and indexes it.

        `output` is what `generate` returned (a tensor or an output object with `.sequences`); its first
        columns must be this call's `input_ids`. Returns the number of blocks newly entered in the index.
        """
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
            raise TypeError(f"output must be generate's (batch, length) tensor or have .sequences, got {output!r}")
        width = self.input_ids.shape[1]
        if sequences.shape[0] != len(self.rows) or not torch.equal(sequences[:, :width].cpu(), self.input_ids):
            raise ValueError("output does not start with this cache's input_ids (same batch, same prompt)")
        if self._released:
            raise RuntimeError("this PagedHFCache was released before commit")
        kv_length = self.get_seq_length()
        committed = 0
        for index, row in enumerate(self.rows):
            self._append_row(index, row, sequences[index, : kv_length].tolist(), kv_length)
            committed += self.paged.commit(row.seq_id)
        return committed

    def _append_row(self, index: int, row: RowPlan, tokens: list[int], kv_length: int) -> None:
        bs = self.paged.block_size
        start = self.paged.num_kv_tokens(row.seq_id)  # a multiple of bs: only full blocks were reused
        end = (kv_length - row.offset) // bs * bs
        end = min(end, start + self.paged.num_free_blocks * bs)
        if end <= start:
            return
        keys, values = [], []
        for layer in self.layers:
            assert isinstance(layer, WorkingLayer)
            k, v = layer.row(index, row.offset + start, row.offset + end)
            keys.append(k.to(self.paged.spec.dtype))
            values.append(v.to(self.paged.spec.dtype))
        try:
            self.paged.append(row.seq_id, tokens[row.offset + start : row.offset + end], keys, values)
        except OutOfBlocksError as exc:  # another user took the free blocks meanwhile: keep what is cached
            logger.warning("prefix cache write-back skipped: %s", exc)

    def release(self) -> None:
        """Frees this call's sequences (idempotent); cached blocks stay reusable."""
        if self._released:
            return
        self._released = True
        for row in self.rows:
            self.paged.free(row.seq_id)

    def __enter__(self) -> PagedHFCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()
