"""`PinnedRows`: the rows of one `generate` call as the cache manager sees them.

Opening: rows with the same prompt (beams, returned sequences: transformers repeats each prompt row) form one
group, and each group opens ONE manager sequence, which pins the longest cached prefix of its real tokens (left
pads removed) in full blocks. The batch restarts at column ``past_length = min_r(pad_r + cached_r)``, capped at
``width - 1`` so the model always computes at least one prompt token (its logits give the first new token).

Loading: `load(layer, keys, values)` fills positions ``[0, past_length)`` of every row from its group's pinned
blocks (each group's KV is gathered once per layer); pad positions stay zero (attention masks them out).

Writing back (`write_back`): every row's full blocks of (token, KV) that are not cached yet are appended to a
`fork` of its group's pin (so rows share the pinned blocks, copy-on-write, instead of copying them) and
committed (named and indexed). A row whose blocks an earlier row of the batch already committed (beams that
agree) writes nothing. If the pool runs out of free blocks, as many leading blocks as fit are kept.

Ownership: the pins and the forks hold pool references until `release()` (idempotent).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..cache.manager import KVCacheManager
from ..memory import OutOfBlocksError
from ..metrics import LOGGER_NAME
from .batch import row_offsets
from .working_layer import WorkingLayer

logger = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class RowGroup:
    """Rows sharing one prompt: `offset` leading pads, then `tokens`; `seq_id` pins `pool_cached` tokens."""

    offset: int
    tokens: tuple[int, ...]
    seq_id: int
    pool_cached: int


class PinnedRows:
    """One generation's row groups and their pins in `manager` (see the module docstring)."""

    def __init__(self, manager: KVCacheManager, input_ids: torch.Tensor, mask: torch.Tensor, *, reuse: bool) -> None:
        self.manager = manager
        self.input_ids, self.mask = input_ids, mask
        self.groups: list[RowGroup] = []
        self.row_group: list[int] = []  # per row, its group; follows the KV rows' reorders
        self._seq_ids: list[int] = []
        keys: dict[tuple[int, tuple[int, ...]], int] = {}
        try:
            for index, offset in enumerate(row_offsets(mask)):
                tokens = tuple(input_ids[index, offset:].tolist())
                if (offset, tokens) not in keys:
                    seq_id = manager.new_sequence(tokens, max_cached_tokens=None if reuse else 0)
                    self._seq_ids.append(seq_id)
                    keys[(offset, tokens)] = len(self.groups)
                    self.groups.append(RowGroup(offset, tokens, seq_id, manager.num_cached_tokens(seq_id)))
                self.row_group.append(keys[(offset, tokens)])
        except BaseException:
            self.release()
            raise
        width = input_ids.shape[1]
        self.past_length = min(min(g.offset + g.pool_cached for g in self.groups), width - 1)

    def matches(self, input_ids: torch.Tensor, mask: torch.Tensor) -> bool:
        """Whether these rows were opened for exactly this prompt batch."""
        return torch.equal(input_ids, self.input_ids) and torch.equal(mask, self.mask)

    @property
    def row_cached_tokens(self) -> tuple[int, ...]:
        """Per row (as opened), the prompt tokens whose KV is loaded instead of computed."""
        return tuple(max(0, self.past_length - self.groups[g].offset) for g in self.row_group)

    def select(self, indices: torch.Tensor) -> None:
        self.row_group = [self.row_group[i] for i in indices.tolist()]

    def repeat_interleave(self, repeats: int) -> None:
        self.row_group = [g for g in self.row_group for _ in range(repeats)]

    def load(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fills positions ``[0, past_length)`` of one layer's (rows, heads, past_length, dim) buffers."""
        spec = self.manager.spec
        if keys.shape[0] != len(self.row_group) or (keys.shape[1], keys.shape[3]) != (spec.num_kv_heads, spec.head_dim):
            raise ValueError(
                f"model KV of shape (batch, heads, _, dim) = {tuple(keys.shape)} does not fit the paged cache "
                f"(batch {len(self.row_group)}, {spec.num_kv_heads} KV heads, head_dim {spec.head_dim})"
            )
        gathered: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for index, g in enumerate(self.row_group):
            group = self.groups[g]
            used = self.past_length - group.offset
            if used <= 0:
                continue
            if g not in gathered:
                gathered[g] = self.manager.read_layer(group.seq_id, layer)
            k, v = gathered[g]
            keys[index, :, group.offset :].copy_(k[:, :used])
            values[index, :, group.offset :].copy_(v[:, :used])

    def write_back(self, tokens: torch.Tensor, layers: list[WorkingLayer]) -> int:
        """Commits every row's new full blocks; `tokens` is (rows, length) on the CPU, aligned with the KV.

        Returns the number of blocks newly entered in the prefix index.
        """
        bs, committed = self.manager.block_size, 0
        length = min(tokens.shape[1], *(layer.get_seq_length() for layer in layers))
        for index, g in enumerate(self.row_group):
            group = self.groups[g]
            real = tokens[index, group.offset : length].tolist()
            start, end = group.pool_cached, len(real) // bs * bs
            if end <= start or self.manager.lookup(real[:end]).num_tokens >= end:
                continue
            end = min(end, start + self.manager.num_free_blocks * bs)
            if end <= start:  # the pool is full of pinned blocks: nothing more can be kept
                continue
            seq_id = self.manager.fork(group.seq_id)
            self._seq_ids.append(seq_id)
            first, last = group.offset + start, group.offset + end
            keys = [layer.row(index, first, last)[0].to(self.manager.spec.dtype) for layer in layers]
            values = [layer.row(index, first, last)[1].to(self.manager.spec.dtype) for layer in layers]
            try:
                self.manager.append(seq_id, real[start:end], keys, values)
            except OutOfBlocksError as exc:  # another user took the free blocks meanwhile: keep what is cached
                logger.warning("prefix cache write-back skipped: %s", exc)
                continue
            committed += self.manager.commit(seq_id)
        return committed

    def release(self) -> None:
        """Frees the pins and the write-back forks (idempotent); committed blocks stay cached."""
        seq_ids, self._seq_ids = self._seq_ids, []
        for seq_id in reversed(seq_ids):
            self.manager.free(seq_id)
