"""`PagedHFCache`: a `PrefixCache` opened for ONE known prompt batch, written back by an explicit `commit`.

For callers that drive the life cycle themselves (the scheduler's HF backend, `generate_with_prefix_cache`)::

    with PagedHFCache(paged, input_ids, attention_mask) as cache:   # 1. lookup + pin, before generate
        out = model.generate(input_ids, attention_mask=attention_mask, cache=cache)
        cache.commit(out)                                            # 2. write back + index full blocks
                                                                     # 3. exit: unpin (no write-back)

`get_seq_length()` answers the restart column from construction on; `generate` recognises the prompt it was
opened for and keeps it. Unlike a plain `PrefixCache`, leaving the ``with`` block (or `release()`) does NOT
write back: only `commit` does, so a failed or abandoned call leaves the prefix cache as it was.
For the drop-in cache passed to any number of `generate` calls, use `PrefixCache` (``engine.hf_cache()``).
Neither sits on a quantized pool (`KVCacheConfig.kv_dtype`): both raise ValueError saying why
(`quantized_pool_refusal`); transformers' caches hold full-precision KV.
"""

from __future__ import annotations

from typing import Any

import torch

from ..cache.manager import KVCacheManager
from .batch import as_batch
from .generate_call import GenerateCall
from .pinned_rows import PinnedRows
from .prefix_cache import PrefixCache, ReuseReport, quantized_pool_refusal
from .row_tokens import RowTokens

__all__ = ["PagedHFCache", "PrefixCache", "ReuseReport", "quantized_pool_refusal"]


class PagedHFCache(PrefixCache):
    """A `PrefixCache` for one `generate` call over `input_ids`; see the module docstring.

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
        super().__init__(paged, max_new_tokens=max_new_tokens)
        self.paged = paged
        self.input_ids, self.attention_mask = as_batch(input_ids, attention_mask)
        self._released = False
        self._slot.write_on_collect = False  # only `commit` writes back
        width = self.input_ids.shape[1]
        self._open(PinnedRows(paged, self.input_ids, self.attention_mask, reuse=True), "explicit", width + max_new_tokens)

    @property
    def row_cached_tokens(self) -> tuple[int, ...]:
        """Per row, the prompt tokens whose KV is loaded instead of computed."""
        assert self.last_reuse is not None
        return self.last_reuse.row_cached_tokens

    @property
    def past_length(self) -> int:
        assert self.last_reuse is not None
        return self.last_reuse.past_length

    def _begin(self, call: GenerateCall) -> None:
        open_ = self._slot.open
        if self._released or open_ is None:
            raise RuntimeError("this PagedHFCache was released (or committed); create one per generate call")
        if call.mask_length == call.input_ids.shape[1]:
            ids, mask = as_batch(call.input_ids, call.attention_mask)
            if open_.forwarded or not open_.rows.matches(ids, mask):
                raise ValueError(
                    f"this PagedHFCache was opened for another prompt batch ({call.mode} runs "
                    f"{tuple(ids.shape)}, opened for {tuple(self.input_ids.shape)}) or has already run; "
                    "create one per generate call, or use PrefixCache, which serves any number of calls"
                )
        super()._begin(call)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._released:
            raise RuntimeError("this PagedHFCache was released; create one per generate call")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def commit(self, output: torch.Tensor | Any) -> int:
        """Writes the KV of every new full block of each row back to the pool and indexes it.

        `output` is what `generate` returned (a tensor or an output object with `.sequences`); its first
        columns must be this call's `input_ids`. Returns the number of blocks newly entered in the index.
        """
        sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
            raise TypeError(f"output must be generate's (batch, length) tensor or have .sequences, got {output!r}")
        width = self.input_ids.shape[1]
        if sequences.shape[0] != self.input_ids.shape[0] or not torch.equal(sequences[:, :width].cpu(), self.input_ids):
            raise ValueError("output does not start with this cache's input_ids (same batch, same prompt)")
        open_ = self._slot.open
        if self._released or open_ is None:
            raise RuntimeError("this PagedHFCache was released (or committed) before commit")
        open_.tokens = RowTokens(sequences[:, : self.layers[0].get_seq_length()].cpu())
        return self.finish()

    def release(self) -> None:
        """Unpins this call's prefixes without writing back (idempotent); cached blocks stay reusable."""
        if self._released:
            return
        self._released = True
        self.discard()

    def close(self) -> None:
        self.release()
