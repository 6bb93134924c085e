"""Validation of `generate` inputs: token ids as a (batch, length) int64 tensor, a left-padding mask.

Rules (each broken one raises ValueError/TypeError naming the value and what was expected):
- `input_ids`: a 1-D or 2-D integer tensor, a list of ints or a list of equal-length lists of ints; at
  least one row and one column; no negative id.
- `attention_mask`: None (every token is real) or the same shape, values 0/1, each row of the form
  ``0...0 1...1`` (left padding) with at least one 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _tensor_from(input_ids: object) -> torch.Tensor:
    if isinstance(input_ids, torch.Tensor):
        return input_ids
    if isinstance(input_ids, str | bytes) or not isinstance(input_ids, Sequence):
        raise TypeError(f"input_ids must be a tensor or a list of token ids, got {type(input_ids).__name__}")
    if input_ids and all(isinstance(row, Sequence) and not isinstance(row, str | bytes) for row in input_ids):
        lengths = {len(row) for row in input_ids}  # type: ignore[arg-type]
        if len(lengths) != 1:
            raise ValueError(f"input_ids rows have different lengths {sorted(lengths)}; pad them (left)")
    try:
        return torch.tensor(input_ids)  # dtype inferred, so floats and bools are caught below
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise ValueError(f"input_ids must hold integer token ids: {exc}") from None


def as_batch(
    input_ids: object, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`input_ids` as a (batch, length) int64 CPU tensor and its (batch, length) int64 mask."""
    ids = _tensor_from(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)}); expected at least one token per row")
    if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype is torch.bool:
        raise ValueError(
            f"input_ids has shape {tuple(ids.shape)} and dtype {ids.dtype}; expected (batch, length) integers"
        )
    ids = ids.to(device="cpu", dtype=torch.long)
    if bool((ids < 0).any()):
        raise ValueError(f"input_ids holds negative token ids ({int(ids.min())}); expected ids >= 0")
    if attention_mask is None:
        return ids, torch.ones_like(ids)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__}")
    mask = attention_mask.unsqueeze(0) if attention_mask.dim() == 1 else attention_mask
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected {tuple(ids.shape)} like input_ids")
    mask = mask.to(device="cpu", dtype=torch.long)
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must hold only 0 and 1")
    row_offsets(mask)  # validates the padding side
    return ids, mask


def row_offsets(mask: torch.Tensor) -> list[int]:
    """Leading pad columns of each row of a left-padding mask (ValueError on any other layout)."""
    offsets: list[int] = []
    for index, row in enumerate(mask.tolist()):
        offset = len(row) - sum(row)
        if offset == len(row):
            raise ValueError(f"attention_mask row {index} has no real token; expected at least one 1")
        if any(row[:offset]) or not all(row[offset:]):
            raise ValueError(
                f"attention_mask row {index} is {row}; expected left padding (0...0 1...1): "
                "use padding_side='left' for decoder-only generation"
            )
        offsets.append(offset)
    return offsets
