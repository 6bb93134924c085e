"""`PrefixCache`: a `transformers.Cache` that reuses and fills the prefix cache across `generate` calls.

Create it once, from an engine (``engine.hf_cache()``) or a `KVCacheManager`, and pass it to any number of
calls, as transformers' own caches are passed::

    cache = engine.hf_cache()
    out = model.generate(input_ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)
    print(cache.last_reuse.cached_tokens)        # prompt tokens whose KV was loaded instead of computed

What happens, and when:
1. **Generation start** (transformers asks `get_seq_length()` before its prefill; see `generate_call`): the
   previous generation, if any, is written back (step 3). Then every row's real tokens (left pads removed) are
   looked up and the longest cached prefix in full blocks is pinned (`PinnedRows`); `get_seq_length()`
   answers the restart column, so transformers prefills only the rest of the prompt. Each layer's prefix is
   copied from the pool into the layer's contiguous working buffer at its first forward (`WorkingLayer`).
   Assisted decoding always feeds the whole prompt in its first forward: nothing is reused there (rows open
   with no cached prefix), but what it computes is written back like any other mode.
2. **During generation** a forward pre-hook on the model records the token ids each forward feeds
   (`RowTokens`), and every reorder (beam search), selection, repetition and crop (assisted decoding) is
   applied to the KV rows and to their token ids alike, so each row's (token, KV) pairs stay exact.
3. **Write-back** (`finish()`): each row's new full blocks are appended and committed: named, indexed and
   written through to the tiers. THIS is when they become visible to other requests and other caches of the
   same manager: when the next `generate` call with this cache starts, on `close()` / the end of a ``with``
   block, or, at the latest, when the cache is garbage collected or the interpreter exits (a
   `weakref.finalize`, see `open_generation`). Pins are held from step 1 to
   step 3 (pinned blocks are never evicted). Beam rows share their pinned prefix (`KVCacheManager.fork`).

A `generate` call that passes only new tokens with the full attention mask (transformers' continuation form)
continues the open generation instead. Forwards run outside `generate` (``model(ids, cache=cache)``)
continue it too, as with `DynamicCache`. A cache serves one `generate` at a time (like every transformers
cache); the manager behind it is thread-safe and may serve other caches and the scheduler meanwhile.
Batches must be left-padded (``padding_side='left'``; ValueError otherwise).
"""

from __future__ import annotations

import logging
import sys
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, get_layer_types_and_kwargs

from ..cache.manager import KVCacheManager
from ..metrics import LOGGER_NAME
from .batch import as_batch
from .generate_call import GenerateCall, assisted_call, prefill_call
from .loaded import kv_shape_of
from .open_generation import GenerationSlot, OpenGeneration
from .pinned_rows import PinnedRows
from .row_tokens import RowTokens
from .working_layer import WorkingLayer

logger = logging.getLogger(LOGGER_NAME)


@dataclass(frozen=True)
class ReuseReport:
    """What the start of one generation found: per row of the batch transformers runs (beams and returned
    sequences expanded), the prompt tokens whose KV was loaded instead of computed; `prompt_tokens` counts
    the real (non-pad) prompt tokens over the same rows."""

    mode: str
    prompt_tokens: int
    row_cached_tokens: tuple[int, ...]
    past_length: int

    @property
    def cached_tokens(self) -> int:
        return sum(self.row_cached_tokens)


def quantized_pool_refusal(manager: KVCacheManager) -> str | None:
    """Why a transformers cache cannot sit on `manager` (its pool is quantized), or None when it can."""
    fmt = manager.spec.pool_format
    if fmt is None:
        return None
    return (f"the KV pool is quantized (kv_dtype={fmt!r}): a transformers cache (engine.hf_cache(), the hf_generate "
            "backend) reads and writes full-precision KV; use kv_dtype=None, or a Llama-family model on the "
            "paged_llama backend, which reads quantized blocks")


class PrefixCache(Cache):
    """See the module docstring.

    `model`, when given, is the only model allowed to generate over this cache (the manager's namespace names
    its weights: another model's KV must never be mixed in); `engine.hf_cache()` passes the engine's model.
    `max_new_tokens` only sizes working buffers when generate does not say.
    """

    def __init__(self, manager: KVCacheManager, *, model: nn.Module | None = None, max_new_tokens: int = 0) -> None:
        if not isinstance(manager, KVCacheManager):
            raise TypeError(f"manager must be a KVCacheManager, got {type(manager).__name__}")
        refusal = quantized_pool_refusal(manager)
        if refusal is not None:
            raise ValueError(refusal)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch nn.Module or None, got {type(model).__name__}")
        self.manager = manager
        self._model = weakref.ref(model) if model is not None else None
        self._max_new_tokens = max_new_tokens
        self._slot = GenerationSlot()
        self._finalizer = weakref.finalize(self, self._slot.finish_quietly)  # holds the slot, not the cache
        self.last_reuse: ReuseReport | None = None
        self.committed_blocks = 0  # over the cache's life
        super().__init__(layers=self._fresh_layers())

    def _fresh_layers(self, rows: PinnedRows | None = None, capacity: int = 0) -> list[Any]:
        past = rows.past_length if rows is not None else 0
        return [
            WorkingLayer(past, capacity, (lambda k, v, layer=layer: rows.load(layer, k, v)) if rows else None)
            for layer in range(self.manager.spec.num_layers)
        ]

    # -- what transformers calls ----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        call = prefill_call(sys._getframe(1), self)
        if call is not None:
            self._begin(call)
        return super().get_seq_length(layer_idx)

    def activate_past_recording(self) -> None:
        call = assisted_call(sys._getframe(1), self)
        if call is not None:
            self._begin(call)
        super().activate_past_recording()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(
                f"layer_idx={layer_idx} is out of range: the paged cache spec has {len(self.layers)} layers"
            )
        if self._slot.open is not None:
            self._slot.open.forwarded = True
        return self.layers[layer_idx].update(key_states, value_states)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if (open_ := self._slot.open) is not None:
            self._select_rows(torch.arange(open_.tokens.rows)[indices.cpu()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if (open_ := self._slot.open) is not None:
            open_.tokens.repeat_interleave(repeats)
            open_.rows.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if (open_ := self._slot.open) is not None:
            open_.tokens.truncate(self.layers[0].get_seq_length())

    def reset(self) -> None:
        """Writes the open generation back and empties the working buffers."""
        self.close()

    def _select_rows(self, indices: torch.Tensor) -> None:
        if (open_ := self._slot.open) is not None:
            open_.tokens.select(indices)
            open_.rows.select(indices.cpu())

    # -- generation life cycle --------------------------------------------------------------------------
    def _begin(self, call: GenerateCall) -> None:
        width = call.input_ids.shape[1]
        if call.mask_length != width:  # only new tokens, the full mask: continue what the cache holds
            held = self.layers[0].get_seq_length()
            if held + width != call.mask_length:
                raise ValueError(
                    f"generate passed {width} new tokens with an attention mask of {call.mask_length} positions, "
                    f"but this cache holds {held}; pass the full input_ids (the cache finds the cached prefix)"
                )
            if self._slot.open is not None:
                self._slot.open.attach(call.model, self)
            return
        ids, mask = as_batch(call.input_ids, call.attention_mask)
        self._check_model(call.model)
        open_ = self._slot.open
        if open_ is not None and not open_.forwarded and open_.rows.matches(ids, mask):
            open_.attach(call.model, self)  # opened for this very prompt (PagedHFCache, a chunked prefill again)
            return
        self.finish()
        capacity = max(call.max_length, width + self._max_new_tokens)
        self._open(PinnedRows(self.manager, ids, mask, reuse=call.reuse), call.mode, capacity)
        self._slot.open.attach(call.model, self)  # type: ignore[union-attr]

    def _open(self, rows: PinnedRows, mode: str, capacity: int) -> None:
        self.layers = self._fresh_layers(rows, capacity)
        self._slot.open = OpenGeneration(rows, RowTokens(rows.input_ids[:, : rows.past_length]), self.layers)
        self.last_reuse = ReuseReport(mode, int(rows.mask.sum()), rows.row_cached_tokens, rows.past_length)
        logger.debug("hf cache: %s generation reuses %d tokens", mode, self.last_reuse.cached_tokens)

    def _check_model(self, model: nn.Module) -> None:
        expected = self._model() if self._model is not None else None
        if self._model is not None and model is not expected:
            raise ValueError(
                f"this cache holds the KV of {type(expected).__name__} object {id(expected):#x}; generate runs "
                f"{type(model).__name__} object {id(model):#x} (another model's KV must never be reused)"
            )
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"{type(model).__name__} is an encoder-decoder model; PrefixCache serves decoder-only models")
        kinds = set(get_layer_types_and_kwargs(config.get_text_config(decoder=True))[0])
        if kinds != {"full_attention"}:
            raise ValueError(
                f"{type(model).__name__} has {sorted(kinds)} layers; PrefixCache serves full-attention layers only "
                "(sliding-window, chunked, linear and shared-KV layers are not supported)"
            )
        shape, spec = kv_shape_of(model), self.manager.spec
        if (shape.num_layers, shape.num_kv_heads, shape.head_dim) != (spec.num_layers, spec.num_kv_heads, spec.head_dim):
            raise ValueError(
                f"the paged cache holds {spec.num_layers} layers x {spec.num_kv_heads} KV heads x {spec.head_dim}; "
                f"the model has {shape.num_layers} x {shape.num_kv_heads} x {shape.head_dim}"
            )

    def finish(self) -> int:
        """Writes the open generation back (see the module docstring, step 3) and unpins its prefixes.

        Returns the number of blocks newly entered in the prefix index (0 when no generation is open).
        Called for you at the next generation's start, `close()`, and garbage collection.
        """
        generation = self._slot.take()
        committed = generation.write_back() if generation is not None else 0
        self.committed_blocks += committed
        return committed

    def discard(self) -> None:
        """Unpins the open generation's prefixes WITHOUT writing it back (e.g. after a failed call)."""
        generation = self._slot.take()
        if generation is not None:
            generation.discard()

    def close(self) -> None:
        """Writes the open generation back and frees the working buffers (idempotent); the cache stays usable."""
        try:
            self.finish()
        finally:
            self.layers = self._fresh_layers()

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
