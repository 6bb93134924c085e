"""`WorkingLayer`: one layer's KV during one `generate` call, in a contiguous growable buffer.

transformers' `DynamicLayer` concatenates a new tensor at every step (O(n) copies per token). This layer
keeps a preallocated ``(batch, kv_heads, capacity, head_dim)`` buffer per K and V and writes each step in
place; capacity doubles when it runs out (amortised O(1) per token). `update` returns views of the first
`length` positions, which attention reads like any tensor.

The layer may start with `length = past_length` tokens that it does not compute: `load_prefix(keys,
values)` fills ``[:, :, :past_length]`` when the buffer is allocated (at the first `update`, when dtype,
device, batch and head count are known).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.cache_utils import CacheLayerMixin

PrefixLoader = Callable[[torch.Tensor, torch.Tensor], None]
_ALIGN = 64


def _round_up(value: int) -> int:
    return -(-value // _ALIGN) * _ALIGN


class WorkingLayer(CacheLayerMixin):
    """A dynamic (full-attention) cache layer over a growable contiguous buffer.

    Invariants: ``0 <= length <= capacity``; positions ``[0, length)`` hold valid KV (pads included, which
    attention masks out); `keys` / `values` are views of exactly those positions once initialized.
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, past_length: int = 0, capacity: int = 0, load_prefix: PrefixLoader | None = None) -> None:
        super().__init__()
        if past_length and load_prefix is None:
            raise ValueError(f"past_length={past_length} needs a load_prefix callable")
        self.length = past_length
        self._capacity_hint = max(capacity, past_length)
        self._load_prefix = load_prefix
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads, new, dim = key_states.shape
        capacity = _round_up(max(self._capacity_hint, self.length + new))
        self.device = key_states.device
        self._k = key_states.new_zeros((batch, heads, capacity, dim))
        self._v = value_states.new_zeros((batch, heads, capacity, value_states.shape[-1]))
        if self.length and self._load_prefix is not None:
            self._load_prefix(self._k[:, :, : self.length], self._v[:, :, : self.length])
        self._set_views()
        self.is_initialized = True

    def _set_views(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, : self.length]
        self.values = self._v[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return 0 if self._k is None else self._k.shape[2]

    def _grow(self, needed: int) -> None:
        assert self._k is not None and self._v is not None
        capacity = _round_up(max(needed, 2 * self.capacity))
        for name in ("_k", "_v"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self.length].copy_(old[:, :, : self.length])
            setattr(self, name, new)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Writes the new states after the first `length` positions; returns views of all valid positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._grow(end)
        self._k[:, :, self.length : end].copy_(key_states)
        self._v[:, :, self.length : end].copy_(value_states)
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drops the last ``-tokens_to_remove`` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop({tokens_to_remove}): pass a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._set_views()

    def _select(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._k is not None and self._v is not None:
            self._k, self._v = fn(self._k), fn(self._v)
            self._set_views()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices, ...])

    def reset(self) -> None:
        self._k = self._v = None
        self.keys = self.values = None
        self.length = 0
        self.is_initialized = False

    def offload(self) -> None:
        """Offloading is the tiers' job; the working buffer stays where the model runs."""

    def prefetch(self) -> None:
        """See `offload`."""

    def row(self, index: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of batch row `index`, positions ``[start, end)``: each (kv_heads, end - start, head_dim)."""
        if self._k is None or self._v is None:
            raise ValueError("the layer holds no KV yet (no forward pass has run)")
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"positions [{start}, {end}) are outside the valid range [0, {self.length})")
        return self._k[index, :, start:end], self._v[index, :, start:end]
