"""`LoadedModel`: a causal LM ready to run, with everything that names the KV it produces.

The prefix namespace of the blocks a model writes is derived from it (`namespace`), so that a block is never
served to another model, other weights, another tokenizer, dtype, block size or layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..memory.kv_spec import LAYOUT_VERSION, KVSpec
from ..prefix.namespace import Namespace
from ..types import KVDType
from .text import TextCodec


@dataclass(frozen=True)
class KVShape:
    """What one token of a model's KV looks like: layers, KV heads and head size."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def kv_shape_of(model: nn.Module) -> KVShape:
    """The KV shape of a decoder-only transformers model, read from its config.

    For a model sharded by transformers' tensor-parallel plan (`model.tp_size` = N > 1) it is the shape of
    the KV this rank computes: ``num_kv_heads / N`` heads (a contiguous slice of them).
    """
    config: Any = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"model {type(model).__name__} has no `config`; expected a transformers causal LM")
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    degree = int(getattr(model, "tp_size", None) or 1)
    if kv_heads % degree:
        raise ValueError(f"model has {kv_heads} KV heads, which a tensor-parallel degree of {degree} does not divide")
    return KVShape(int(config.num_hidden_layers), kv_heads // degree, int(head_dim))


def max_context_of(model: nn.Module) -> int:
    """The longest sequence (prompt + generated tokens) a model's positions cover."""
    config: Any = model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM in eval mode with its tokenizer and identity.

    `weights_fingerprint` is a SHA-256 hex digest of the weights; `tokenizer.identity` names the token mapping.
    The model object itself is shared and mutable (torch); the record is not.
    """

    model: nn.Module
    tokenizer: TextCodec
    model_id: str
    weights_fingerprint: str
    dtype: torch.dtype
    device: torch.device
    max_context: int
    path: Path | None = None

    @property
    def tokenizer_id(self) -> str:
        return self.tokenizer.identity

    @property
    def kv_shape(self) -> KVShape:
        return kv_shape_of(self.model)

    def kv_spec(
        self, block_size: int, dtype: torch.dtype | KVDType | str | None = None, device: torch.device | None = None
    ) -> KVSpec:
        """A `KVSpec` for this model's KV; dtype and device default to the model's own."""
        shape = self.kv_shape
        return KVSpec(
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            block_size=block_size,
            dtype=self.dtype if dtype is None else KVDType.parse(dtype).torch,
            device=self.device if device is None else device,
        )

    def namespace(self, spec: KVSpec, codec: str = "identity", tenant_salt: str = "") -> Namespace:
        """The prefix namespace of the KV this model writes into a pool described by `spec`."""
        shape = self.kv_shape
        if (spec.num_layers, spec.num_kv_heads, spec.head_dim) != (
            shape.num_layers,
            shape.num_kv_heads,
            shape.head_dim,
        ):
            raise ValueError(f"KV spec {spec} does not fit model {self.model_id!r} whose KV shape is {shape}")
        return Namespace(
            model_id=self.model_id,
            weights_fingerprint=self.weights_fingerprint,
            tokenizer_id=self.tokenizer_id,
            dtype=KVDType.parse(spec.dtype).value,
            block_size=spec.block_size,
            layout_version=LAYOUT_VERSION,
            codec=codec,
            tenant_salt=tenant_salt,
        )
