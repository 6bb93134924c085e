"""`PressStep`: what the paged backend calls when a sequence's last prefill chunk is done, to press its prompt.

It builds the configured press (`compression.presses`), observes the prefilled prompt when the press reads
the observation window's attention or the keys (`model.press_scores.observe`: the window re-run, the pool never
written), selects per layer and KV head the tokens kept, takes fresh blocks from the cache
(`allocate_scratch`: the prompt's own blocks may be named and shared, so they are never written) and compacts
the kept tokens into them (`reference_compact_kv`). It returns the new table; the old one is the caller's to
release (its named blocks stay cached: they hold the correct KV of the prompt). A quantized pool (`QuantPool`):
the prompt is read dequantised, pressed in full precision and the pressed blocks quantized on write (sealed).

Budget: the press's budget rounded UP to whole blocks (capped at the prompt), so every pressed block is full
and the pressed chain can be named whole (`pressed_block_hashes`). Positions: the kept keys carry RoPE of their
original positions; the next token must run at RoPE position ``length`` while its KV goes to slot ``kept``.
With `inv_freq` given, the kept keys are rotated by ``-(length - kept)`` (`model.rope_shift`) and the next
token runs at position ``kept`` like any paged sequence (`PressResult.rope_offset` 0); without it the caller
adds ``rope_offset = length - kept`` to the RoPE position of every later token of the sequence.

Reuse (`acquire`): the pressed chain of a prompt is named by the whole prompt (`pressed_block_hashes`), so a
later prompt reuses it only for a prefix of exactly the pressed length. `acquire` tries the longest first of
the lengths this step pressed lately (`remember`, at most `MEMORY` of them) and the whole given length, and
takes the chain found entire (`KVCacheManager.acquire_named`, all or nothing).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..cache.manager import KVCacheManager
from ..compression.presses import PressConfig, make_press, press_namespace, pressed_block_hashes
from ..kernels.reference_compact import reference_compact_kv
from ..memory import OutOfBlocksError
from ..metrics import LOGGER_NAME
from ..model.kv_views import Pool, QuantPool
from ..model.paged_llama import PagedLlama
from ..model.press_scores import dequantized_blocks, observe, pool_reader
from ..model.rope_shift import shift_key_positions
from ..prefix import Namespace

logger = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class PressResult:
    """A pressed prompt: `table` (scratch blocks of the cache, held by the caller, `kept` tokens of KV), `freed`
    (the old table, for the caller to release), the prompt `length`, `rope_offset` (added to a later token's KV
    index to get its RoPE position), the kept indices (layers, kv_heads, kept) on the host, and the names of the
    pressed blocks (`pressed_block_hashes`, to commit under `namespace`)."""

    table: tuple[int, ...]
    freed: tuple[int, ...]
    kept: int
    length: int
    rope_offset: int
    indices: Tensor
    hashes: tuple[bytes, ...]
    namespace: Namespace


MEMORY = 16  # pressed lengths `acquire` tries besides the prompt's own


@dataclass(frozen=True)
class PressHit:
    """A reused pressed chain: `blocks` (one reference each, the caller's to give back with `free_scratch`) hold
    `kept` tokens of KV standing for the first `length` tokens of the prompt."""

    blocks: tuple[int, ...]
    length: int
    kept: int


class PressStep:
    """Presses prefilled prompts of `model` held in `cache` by `config` (see the module docstring)."""

    def __init__(self, config: PressConfig, model: PagedLlama, cache: KVCacheManager,
                 inv_freq: Tensor | None = None) -> None:
        self.config = config
        self.press = make_press(config)
        self.model, self.cache = model, cache
        self.inv_freq = inv_freq
        self.namespace = press_namespace(cache.namespace, config)
        self._lengths: dict[int, None] = {}  # pressed lengths, oldest first

    def remember(self, length: int) -> None:
        """A prompt of `length` tokens was pressed and its chain named: `acquire` tries that length."""
        self._lengths.pop(length, None)
        self._lengths[length] = None
        while len(self._lengths) > MEMORY:
            del self._lengths[next(iter(self._lengths))]

    def acquire(self, tokens: Sequence[int], limit: int) -> PressHit | None:
        """The longest pressed chain the cache holds entire for a prefix of `tokens[:limit]` (lengths: `limit`
        and the remembered ones below it), its blocks taken; None when there is none."""
        for length in sorted({limit, *(n for n in self._lengths if n < limit)}, reverse=True):
            kept = self.kept_tokens(length) if length >= 1 else length
            if kept >= length:
                continue
            hashes = pressed_block_hashes(tokens[:length], self.cache.namespace, self.config, kept)
            blocks = self.cache.acquire_named(hashes, length)
            if blocks is not None:
                return PressHit(blocks, length, kept)
        return None

    def kept_tokens(self, length: int) -> int:
        """Tokens kept of a `length`-token prompt: the budget rounded up to whole blocks, at most `length`."""
        bs = self.cache.block_size
        return min(length, math.ceil(self.config.budget(length) / bs) * bs)

    def select(self, table: Sequence[int], prompt: Sequence[int], source: Tensor | None = None) -> Tensor:
        """Kept token indices (layers, kv_heads, kept) int64 of the prefilled `prompt` held in blocks `table` of
        the full-precision pool `source` (default: the cache's pool)."""
        length = len(prompt)
        read = pool_reader(source if source is not None else self.cache.kv, table, length)
        window = self.press.observation_window(length)
        kept = self.kept_tokens(length)
        rows = [self.press.select(obs, kept) for obs in observe(self.model, read, prompt, window, self.press.needs_keys)]
        return torch.stack(rows)

    def apply(self, table: Sequence[int], prompt: Sequence[int], pool: Pool | None = None) -> PressResult | None:
        """Presses the prefilled `prompt` (all its tokens have KV, in `table`); None when the budget keeps every
        token or the cache has no free blocks for the pressed copy (logged), nothing changed then.

        `pool` is what the model reads (default: the cache's pool). For a `QuantPool`, `table` is the sequence's
        KERNEL row (staging entries for unsealed blocks): the prompt is read dequantised, pressed in full
        precision, and the pressed blocks (all full) are quantized on write into the new pool blocks, sealed."""
        length = len(prompt)
        kept = self.kept_tokens(length)
        if kept >= length:
            return None
        pool = pool if pool is not None else self.cache.kv
        quant = pool if isinstance(pool, QuantPool) else None
        source = dequantized_blocks(quant, table, length) if quant is not None else pool
        src_table = list(range(int(source.shape[0]))) if quant is not None else list(table)
        indices = self.select(src_table, prompt, source)
        count = -(-kept // self.cache.block_size)
        try:
            blocks = self.cache.allocate_scratch(count)
        except OutOfBlocksError as exc:
            logger.warning("prompt of %d tokens not pressed: %s", length, exc)
            return None
        device = source.device
        dst = torch.empty((count, *source.shape[1:]), dtype=source.dtype, device=device) if quant else source
        dst_ids = list(range(count)) if quant is not None else blocks
        reference_compact_kv(source, torch.tensor(src_table, dtype=torch.long, device=device), indices.to(device),
                             torch.tensor(dst_ids, dtype=torch.long, device=device), dst_pool=dst)
        offset = length - kept
        if self.inv_freq is not None:
            shift_key_positions(dst, dst_ids, kept, offset, self.inv_freq)
            offset = 0
        if quant is not None:
            self.model.backend.seal_blocks(dst, torch.arange(count, device=device), quant.pool,
                                           torch.tensor(blocks, dtype=torch.long, device=device), quant.format)
        hashes = pressed_block_hashes(prompt, self.cache.namespace, self.config, kept)
        return PressResult(tuple(blocks), tuple(table), kept, length, offset, indices.cpu(), tuple(hashes),
                           self.namespace)
