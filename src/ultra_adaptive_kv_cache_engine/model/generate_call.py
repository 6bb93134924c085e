"""`GenerateCall`: what a `Cache` learns of the `generate` call that is starting to use it.

transformers (pinned 5.24) tells a user-supplied cache nothing about the prompt before it decides how much of
it to prefill: `GenerationMixin._prefill` asks ``cache.get_seq_length()`` and then feeds
``input_ids[:, get_seq_length():]``. To look the prompt up in the prefix cache at that moment, the cache reads
the prompt from the caller's frame, and only from these two frames, recognised by their code objects:

- `GenerationMixin._prefill` (greedy, sampling, beam search; every mode but assisted decoding), when it calls
  `get_seq_length()`: locals `self` (the model), `input_ids` (expanded for beams and returned sequences),
  `model_kwargs` (``attention_mask``, None when it was all ones) and `generation_config` (``_mask_length``).
- `GenerationMixin._assisted_decoding`, when it calls ``cache.activate_past_recording()`` before its first
  forward, which always feeds the whole prompt (so nothing can be reused there, only written back).

This module is the one place coupled to transformers' internals; `tests/test_hf_dropin.py` fails if a
transformers upgrade moves them. Any other caller (a model's forward, user code) gets None. Prompts given
as embeddings (``inputs_embeds``) have no ids to look up: ValueError naming the mode.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import nn
from transformers.generation.utils import GenerationMixin

_PREFILL = inspect.unwrap(GenerationMixin._prefill).__code__
_ASSISTED = inspect.unwrap(GenerationMixin._assisted_decoding).__code__


@dataclass(frozen=True)
class GenerateCall:
    """The prompt of one `generate` call as the cache sees it.

    `input_ids` is (rows, width) on the model's input device, one row per sequence generate runs (beams and
    returned sequences expanded); `attention_mask` is None when every position is real. `mask_length` is the
    width of the full attention mask: a smaller `input_ids` means the caller passed only new tokens after the
    KV the cache already holds. `reuse` is False where the first forward computes the whole prompt anyway.
    """

    model: nn.Module
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    mask_length: int
    reuse: bool
    mode: str
    max_length: int  # prompt + new tokens at most (sizes the working buffers; 0 when unknown)


def _uses(cache: object, model_kwargs: Any) -> bool:
    return isinstance(model_kwargs, dict) and model_kwargs.get("cache") is cache


def _call(frame: FrameType, cache: object, reuse: bool, mode: str) -> GenerateCall | None:
    local = frame.f_locals
    model, input_ids, model_kwargs = local.get("self"), local.get("input_ids"), local.get("model_kwargs")
    if not (_uses(cache, model_kwargs) and isinstance(model, nn.Module) and isinstance(input_ids, torch.Tensor)):
        return None
    if model_kwargs.get("inputs_embeds") is not None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(
            f"{mode} from inputs_embeds is not supported by PrefixCache (it looks prompts up by token id); "
            "pass input_ids, or use transformers' DynamicCache"
        )
    mask = model_kwargs.get("attention_mask")
    config = local.get("generation_config")
    mask_length = mask.shape[1] if isinstance(mask, torch.Tensor) else getattr(config, "_mask_length", -1)
    if mask_length is None or mask_length < 0:
        mask_length = input_ids.shape[1]
    max_length = int(getattr(config, "max_length", None) or 0)
    return GenerateCall(
        model, input_ids, mask if isinstance(mask, torch.Tensor) else None, mask_length, reuse, mode, max_length
    )


def prefill_call(frame: FrameType | None, cache: object) -> GenerateCall | None:
    """The starting call if `frame` is `_prefill` asking `cache` how much it holds, else None."""
    if frame is None or frame.f_code is not _PREFILL:
        return None
    local = frame.f_locals
    config = local.get("generation_config")
    if getattr(config, "is_assistant", False) or not local.get("is_first_iteration", True):
        return None  # a draft model's repeated prefills over its own cache
    beams, sampling = getattr(config, "num_beams", 1) > 1, getattr(config, "do_sample", False)
    mode = "beam search" if beams else "sampling" if sampling else "greedy"
    return _call(frame, cache, reuse=True, mode=mode)


def assisted_call(frame: FrameType | None, cache: object) -> GenerateCall | None:
    """The starting call if `frame` is `_assisted_decoding` preparing `cache`, else None."""
    if frame is None or frame.f_code is not _ASSISTED:
        return None
    return _call(frame, cache, reuse=False, mode="assisted decoding")
