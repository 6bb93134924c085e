"""`generate_with_prefix_cache`: `model.generate` that reuses cached prompt prefixes and caches new ones.

The caller passes the FULL prompt; the helper runs generate over a `PrefixCache` (every mode it supports:
greedy, sampling, beam search, assisted decoding, several returned sequences), writes the new full blocks back
before returning and returns the output with exact accounting. Output is token-for-token the output of the
same `generate` with transformers' `DynamicCache` (tested on CPU).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from ..cache.manager import KVCacheManager
from .batch import as_batch, row_offsets
from .loaded import kv_shape_of, max_context_of
from .prefix_cache import PrefixCache

_REFUSED = {
    "cache": "the prefix cache is the cache (pass a PrefixCache to model.generate instead)",
    "past_key_values": "the prefix cache is the cache (pass a PrefixCache to model.generate instead)",
    "cache_implementation": "the prefix cache is the cache",
}


@dataclass(frozen=True)
class GenerationResult:
    """What one `generate_with_prefix_cache` call did.

    `output_ids` is generate's (batch x returned sequences, input_length + new_tokens) tensor, prompt (and
    its left pads) included. Token counts exclude pads and sum over the prompt rows given (not over beams or
    returned sequences); `row_cached_tokens` gives them per prompt row.
    `ttft_s` runs from the call until the first token's logits exist (lookup and prefix load included).
    """

    output_ids: torch.Tensor
    input_length: int
    prompt_tokens: int
    cached_tokens: int
    row_cached_tokens: tuple[int, ...]
    committed_blocks: int
    ttft_s: float
    total_s: float

    @property
    def generated_ids(self) -> torch.Tensor:
        """The new tokens only: (batch, new_tokens)."""
        return self.output_ids[:, self.input_length :]

    @property
    def new_tokens(self) -> int:
        return self.output_ids.shape[1] - self.input_length

    @property
    def cache_hit(self) -> bool:
        return self.cached_tokens > 0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per row after the first one (0.0 when only one token was generated)."""
        decode_s = self.total_s - self.ttft_s
        return (self.new_tokens - 1) / decode_s if self.new_tokens > 1 and decode_s > 0 else 0.0


class FirstTokenClock(LogitsProcessor):
    """Notes when the first logits are ready; leaves the scores unchanged."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


def _check_kwargs(kwargs: dict[str, Any]) -> None:
    for name, why in _REFUSED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"{name}={kwargs[name]!r} cannot be passed to generate_with_prefix_cache: {why}")
    if kwargs.get("use_cache") is False:
        raise ValueError("use_cache=False contradicts prefix caching; call model.generate directly")


def _check_fit(model: nn.Module, paged: KVCacheManager, input_length: int, max_new_tokens: int | None) -> None:
    shape, spec = kv_shape_of(model), paged.spec
    if (shape.num_layers, shape.num_kv_heads, shape.head_dim) != (spec.num_layers, spec.num_kv_heads, spec.head_dim):
        raise ValueError(
            f"the paged cache holds {spec.num_layers} layers x {spec.num_kv_heads} KV heads x {spec.head_dim}; "
            f"the model has {shape.num_layers} x {shape.num_kv_heads} x {shape.head_dim}"
        )
    context = max_context_of(model)
    wanted = input_length + (max_new_tokens or 1)
    if wanted > context:
        raise ValueError(
            f"prompt of {input_length} tokens + {max_new_tokens or 1} new token(s) = {wanted} exceeds the "
            f"model's context of {context} tokens; shorten the prompt or lower max_new_tokens"
        )


def generate_with_prefix_cache(
    model: nn.Module,
    paged: KVCacheManager,
    input_ids: torch.Tensor | list[int] | list[list[int]],
    attention_mask: torch.Tensor | None = None,
    **generate_kwargs: Any,
) -> GenerationResult:
    """`model.generate(input_ids, **generate_kwargs)` reusing and filling `paged`'s prefix cache.

    Batches must be left-padded (ValueError otherwise); a caller's own cache is refused. At least one prompt
    token is always computed. The new blocks are committed before it returns; if generate fails, nothing is.
    """
    _check_kwargs(generate_kwargs)
    ids, mask = as_batch(input_ids, attention_mask)
    _check_fit(model, paged, ids.shape[1], generate_kwargs.get("max_new_tokens"))
    clock = FirstTokenClock()
    processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
    processors.append(clock)
    device = next(model.parameters()).device
    started = time.perf_counter()
    cache = PrefixCache(paged, max_new_tokens=generate_kwargs.get("max_new_tokens") or 0)
    try:
        output = model.generate(
            ids.to(device), attention_mask=mask.to(device), cache=cache, logits_processor=processors, **generate_kwargs
        )
        finished = time.perf_counter()
        committed = cache.finish()
    finally:
        cache.discard()  # after a failure: unpin without writing back
        cache.close()
    report = cache.last_reuse
    past = report.past_length if report is not None else 0
    row_cached = tuple(max(0, past - offset) for offset in row_offsets(mask))
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    return GenerationResult(
        output_ids=sequences,
        input_length=ids.shape[1],
        prompt_tokens=int(mask.sum()),
        cached_tokens=sum(row_cached),
        row_cached_tokens=row_cached,
        committed_blocks=committed,
        ttft_s=(clock.first or finished) - started,
        total_s=finished - started,
    )
