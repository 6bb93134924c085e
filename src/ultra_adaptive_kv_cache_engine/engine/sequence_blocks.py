"""`SequenceBlocks`: a sequence's KV in the block pool, through the cache façade only.

`open(tokens)` opens the cache's sequence for `tokens` (the longest cached prefix reused, capped at all but
the last token so the model computes its logits) and gives the other tokens their blocks by appending
placeholder (zero) KV, which the forward overwrites in place before anything names those blocks (a quantized
pool: the blocks are only reserved; the backend seals them before they are named). Tokens
after the opened ones (generated later) live in scratch blocks taken with `grow`, one block at a time.

Invariants:
- ``table`` is the cache's block table followed by the scratch blocks; token ``t`` lives in block
  ``table[t // block_size]`` at offset ``t % block_size`` and the pool is written only in these blocks.
- `commit_opened` is called once the opened tokens' KV is really computed (never before: named blocks hold
  zeros until then); `write_back` appends the KV of tokens after the opened ones (copied out of the scratch
  blocks, which it frees first) and commits, so a later turn reuses them; `write_back_sealed` does the same
  for a quantized pool's sealed blocks (their slabs copied as they are).
- `release` gives back every block (scratch and the sequence's references); cached blocks stay reusable.

A pressed sequence (`compression.presses`, see `engine.press_step`): its prompt's first `opened` tokens are
held as `kept` tokens of KV in blocks named by the press (`open_pressed`: reused; `adopt_pressed`: just
pressed, the cache's sequence of the unpressed prompt released), held like scratch blocks, under a new empty
cache sequence; ``offset = opened - kept`` and token ``t >= opened`` lives in slot ``t - offset``. Its KV is
never written back (the pressed KV is not the KV of its tokens' names).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from ..cache.manager import KVCacheManager
from ..memory import OutOfBlocksError
from ..metrics import LOGGER_NAME

logger = logging.getLogger(LOGGER_NAME)


@dataclass
class PooledSequence:
    """One open sequence: `opened` tokens recorded in the cache's sequence `seq_id`, `cached` of them reused."""

    seq_id: int
    opened: int
    cached: int
    table: list[int]
    scratch: list[int] = field(default_factory=list)
    committed: bool = False
    hit_tiers: tuple[str, ...] = ()  # where each reused block was ("pool" or a tier's name)
    offset: int = 0  # tokens a press evicted: token t >= opened lives in slot t - offset
    pressed: bool = False
    press_at: int | None = None  # the backend presses the sequence once its first press_at tokens have KV

    def slot(self, token: int) -> int:
        """The KV slot of token index `token` (its RoPE position too: pressed keys are shifted)."""
        return token - self.offset


class SequenceBlocks:
    """Opens, grows, writes back and releases sequences over `cache` (see the module docstring)."""

    def __init__(self, cache: KVCacheManager) -> None:
        self.cache = cache
        self.block_size = cache.block_size

    def blocks_to_open(self, tokens: list[int]) -> int:
        """Free blocks `open(tokens)` takes beyond the cached prefix it finds in the pool now."""
        reused = self.cache.lookup(tokens[: len(tokens) - 1]).num_tokens
        return math.ceil(len(tokens) / self.block_size) - reused // self.block_size

    def open(self, tokens: list[int]) -> PooledSequence:
        """Opens a sequence for `tokens` (OutOfBlocksError, nothing held, when the pool lacks blocks)."""
        cache, spec = self.cache, self.cache.spec
        seq_id = cache.new_sequence(tokens, max_cached_tokens=len(tokens) - 1)
        try:
            cached = cache.num_cached_tokens(seq_id)
            if spec.pool_format is not None:
                cache.append(seq_id, tokens[cached:], None, None)
            else:
                zeros = torch.zeros((spec.num_kv_heads, len(tokens) - cached, spec.head_dim), dtype=spec.dtype,
                                    device=spec.device)
                cache.append(seq_id, tokens[cached:], [zeros] * spec.num_layers, [zeros] * spec.num_layers)
            table = list(cache.block_table(seq_id))
        except BaseException:
            cache.free(seq_id)
            raise
        return PooledSequence(seq_id, len(tokens), cached, table, hit_tiers=cache.sequence_hits(seq_id).tiers)

    def open_pressed(self, blocks: tuple[int, ...], length: int, kept: int) -> PooledSequence:
        """A sequence over a reused pressed chain: `blocks` (one reference each, taken by `acquire_named`) hold
        `kept` tokens of KV standing for the prompt's first `length` tokens."""
        seq_id = self.cache.new_sequence(())
        return PooledSequence(seq_id, length, length, list(blocks), list(blocks), committed=True,
                              offset=length - kept, pressed=True)

    def adopt_pressed(self, seq: PooledSequence, blocks: tuple[int, ...], kept: int) -> None:
        """Replaces the KV of `seq`'s `opened` tokens by their pressed copy in scratch `blocks` (`kept` tokens):
        the cache's sequence of the unpressed tokens is released (its named blocks stay cached), a new empty
        one takes its place."""
        self._free_scratch(seq)
        self.cache.free(seq.seq_id)
        seq.seq_id = self.cache.new_sequence(())
        seq.table, seq.scratch = list(blocks), list(blocks)
        seq.offset, seq.pressed, seq.committed = seq.opened - kept, True, True

    def grow(self, seq: PooledSequence, total_tokens: int) -> bool:
        """Makes `seq.table` cover `total_tokens` tokens (their slots) with scratch blocks; False (nothing taken)
        if the pool lacks them."""
        missing = math.ceil(seq.slot(total_tokens) / self.block_size) - len(seq.table)
        if missing <= 0:
            return True
        try:
            blocks = self.cache.allocate_scratch(missing)
        except OutOfBlocksError:
            return False
        seq.scratch += blocks
        seq.table += blocks
        return True

    def commit_opened(self, seq: PooledSequence) -> int:
        """Names the full blocks of the opened tokens (their KV is computed now); returns how many were new."""
        seq.committed = True
        return self.cache.commit(seq.seq_id)

    def write_back(self, seq: PooledSequence, tokens: list[int]) -> int:
        """Appends the KV of `tokens` (those after the opened ones that have KV, in order) and commits; returns
        the blocks newly committed. The scratch blocks are freed either way."""
        if not tokens or not seq.committed:
            self._free_scratch(seq)
            return 0
        kv = self.cache.kv
        positions = torch.arange(seq.opened, seq.opened + len(tokens), device=kv.device)
        table = torch.tensor(seq.table, dtype=torch.int64, device=kv.device)
        rows = kv[table[positions // self.block_size], :, :, positions % self.block_size]  # (T, L, 2, H, D)
        keys = [rows[:, layer, 0].transpose(0, 1) for layer in range(kv.shape[1])]
        values = [rows[:, layer, 1].transpose(0, 1) for layer in range(kv.shape[1])]
        self._free_scratch(seq)  # the copies above are taken: the append may reuse these blocks
        try:
            self.cache.append(seq.seq_id, tokens, keys, values)
        except OutOfBlocksError as exc:  # keep what is cached; the generated tail is just not reusable
            logger.warning("generated tokens not written back: %s", exc)
            return 0
        return self.cache.commit(seq.seq_id)

    def write_back_sealed(self, seq: PooledSequence, tokens: list[int]) -> int:
        """A quantized pool's `write_back`: `tokens` (after the opened ones) fill whole blocks that are all sealed
        in `seq.table`; their slabs are copied out of the scratch blocks (freed first), the tokens appended
        (reserved) and the copies put into the blocks the cache gives them, then committed."""
        if not tokens or not seq.committed:
            self._free_scratch(seq)
            return 0
        bs, kv = self.block_size, self.cache.kv
        own = len(seq.table) - len(seq.scratch)  # blocks of the cache's own table, sealed in place
        end = (seq.opened + len(tokens)) // bs
        index = torch.tensor(seq.table[own:end], dtype=torch.int64, device=kv.device)
        slabs = kv.index_select(0, index)
        self._free_scratch(seq)
        try:
            self.cache.append(seq.seq_id, tokens, None, None)
        except OutOfBlocksError as exc:
            logger.warning("generated tokens not written back: %s", exc)
            return 0
        table = self.cache.block_table(seq.seq_id)
        kv.index_copy_(0, torch.tensor(table[own:end], dtype=torch.int64, device=kv.device), slabs)
        return self.cache.commit(seq.seq_id)

    def release(self, seq: PooledSequence) -> None:
        """Gives back the scratch blocks and the sequence's references."""
        self._free_scratch(seq)
        self.cache.free(seq.seq_id)

    def _free_scratch(self, seq: PooledSequence) -> None:
        if seq.scratch:
            self.cache.free_scratch(seq.scratch)
            del seq.table[len(seq.table) - len(seq.scratch) :]
            seq.scratch = []
