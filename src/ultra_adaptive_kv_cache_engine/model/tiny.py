"""A tiny random Llama for fast tests and demos: built from a config in milliseconds, seeded, no files.

Its tokenizer is `ByteTextCodec` (UTF-8 bytes), so the same text and chat paths as the real model run on it,
and tests may also feed token ids directly. Weights are drawn with a wider initializer than usual so that
greedy decoding has clear winners (exactness tests compare token ids, not logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .fingerprint import state_dict_fingerprint
from .loaded import LoadedModel
from .text import ByteTextCodec


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape and seed of a tiny random Llama (defaults: 2 layers, hidden 64, 4 heads, 2 KV heads)."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 320
    max_position_embeddings: int = 512
    initializer_range: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyLlamaSpec.{name}={value!r} must be a positive integer")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinyLlamaSpec: hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}, "
                f"which must divide by num_kv_heads={self.num_kv_heads}"
            )
        if not 259 <= self.vocab_size <= 1 << 16:
            raise ValueError(f"TinyLlamaSpec.vocab_size={self.vocab_size} must be in [259, 65536] (bytes + 3)")

    @property
    def model_id(self) -> str:
        return (
            f"tiny-llama-L{self.num_layers}-H{self.hidden_size}-A{self.num_heads}-KV{self.num_kv_heads}"
            f"-V{self.vocab_size}-seed{self.seed}"
        )


def build_tiny_llama(spec: TinyLlamaSpec | None = None, device: torch.device | str = "cpu") -> LoadedModel:
    """A seeded random `LlamaForCausalLM` (float32, eval mode) with a byte tokenizer.

    The global RNG state is left as it was; the same spec always gives the same weights.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinyLlamaSpec()
    codec = ByteTextCodec()
    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        pad_token_id=codec.pad_token_id,
        bos_token_id=ByteTextCodec.BOS,
        eos_token_id=codec.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model = model.to(device=torch.device(device), dtype=torch.float32).eval()
    return LoadedModel(
        model=model,
        tokenizer=codec,
        model_id=spec.model_id,
        weights_fingerprint=state_dict_fingerprint(model),
        dtype=torch.float32,
        device=torch.device(device),
        max_context=spec.max_position_embeddings,
        path=None,
    )
