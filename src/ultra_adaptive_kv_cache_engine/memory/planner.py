"""Turns a memory budget into a number of pool blocks."""

from __future__ import annotations

from .kv_spec import KVSpec


def plan_num_blocks(spec: KVSpec, budget_bytes: int, max_blocks: int | None = None) -> int:
    """The largest number of whole blocks of `spec` that fit in `budget_bytes` (capped at `max_blocks`).

    Raises ValueError if the budget is not a non-negative integer or does not fit a single block.
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
        raise ValueError(f"budget_bytes={budget_bytes!r} must be a non-negative integer")
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1):
        raise ValueError(f"max_blocks={max_blocks!r} must be a positive integer or None")
    num_blocks = budget_bytes // spec.bytes_per_block
    if num_blocks < 1:
        raise ValueError(
            f"budget_bytes={budget_bytes} does not fit one block of {spec.bytes_per_block} bytes "
            f"({spec.block_size} tokens x {spec.bytes_per_token} bytes per token)"
        )
    return num_blocks if max_blocks is None else min(num_blocks, max_blocks)
