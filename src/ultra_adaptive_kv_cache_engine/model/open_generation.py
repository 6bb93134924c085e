"""`OpenGeneration`: one generation of a `PrefixCache` between its start and its write-back.

It holds what the write-back needs (the pinned rows, their token ids, the KV layers, whether a forward ran)
and the forward pre-hook that records the ids each forward of the model feeds. `GenerationSlot` holds the
cache's open generation; the cache's finalizer holds the slot, not the cache, so that garbage collection
and interpreter exit (`weakref.finalize` runs before the interpreter tears modules down) still write back.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..metrics import LOGGER_NAME
from .pinned_rows import PinnedRows
from .row_tokens import RowTokens

logger = logging.getLogger(LOGGER_NAME)


@dataclass(eq=False)
class OpenGeneration:
    """Rows pinned until `write_back` or `discard` (exactly one of them runs, once)."""

    rows: PinnedRows
    tokens: RowTokens
    layers: list[Any]
    forwarded: bool = False
    hook: RemovableHandle | None = None
    model: weakref.ref[nn.Module] | None = None

    def attach(self, model: nn.Module, cache: object) -> None:
        """Records the ids of every forward of `model` that runs on `cache` (held weakly)."""
        if self.model is not None and self.model() is model:
            return
        self.detach()
        cache_ref, tokens = weakref.ref(cache), self.tokens

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            used = kwargs.get("cache", kwargs.get("past_key_values"))
            if tokens.lost or used is None or used is not cache_ref():
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(ids, torch.Tensor) and ids.dim() == 2:
                tokens.append(ids)
            else:  # embeddings fed: the ids behind the next positions are unknown, stop writing back there
                tokens.lost = True

        self.hook = model.register_forward_pre_hook(record, with_kwargs=True)
        self.model = weakref.ref(model)

    def detach(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        self.hook = self.model = None

    def write_back(self) -> int:
        """Commits the rows' new full blocks (if a forward ran) and unpins; returns the blocks newly indexed."""
        self.detach()
        try:
            return self.rows.write_back(self.tokens.host(), self.layers) if self.forwarded else 0
        finally:
            self.rows.release()

    def discard(self) -> None:
        """Unpins without writing back."""
        self.detach()
        self.rows.release()


class GenerationSlot:
    """The open generation of one cache, or None; `write_on_collect` False makes the finalizer only unpin."""

    def __init__(self, write_on_collect: bool = True) -> None:
        self.open: OpenGeneration | None = None
        self.write_on_collect = write_on_collect

    def take(self) -> OpenGeneration | None:
        generation, self.open = self.open, None
        return generation

    def finish_quietly(self) -> None:
        """The finalizer: writes the open generation back (or unpins it), logging instead of raising."""
        generation = self.take()
        if generation is None:
            return
        try:
            generation.write_back() if self.write_on_collect else generation.discard()
        except Exception:  # noqa: BLE001 - never raise from a finalizer; the blocks stay uncommitted
            logger.exception("hf cache: write-back at garbage collection failed")
