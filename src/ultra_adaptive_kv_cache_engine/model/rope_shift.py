"""Moving pressed keys to new RoPE positions, so a pressed sequence runs as an ordinary paged sequence.

After a press, a sequence of `length` prompt tokens keeps `kept` of them; their keys carry RoPE of their
ORIGINAL positions. Its next token must see every kept key at its true distance. Rotating every kept key by
the same ``-delta`` (``delta = length - kept``) keeps every distance between kept keys and later queries when
the later tokens then run at positions ``kept, kept + 1, ...`` (their KV index) instead of ``length,
length + 1, ...``: RoPE scores depend on ``query position - key position`` only, and R(a) R(b) = R(a + b).
So the kernels, the decode graphs and the slot arithmetic stay as they are; only the caller's position of the
next token moves by delta. Negative resulting positions (early sinks) are fine: a rotation by a negative angle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def shift_key_positions(pool: Tensor, block_ids: Sequence[int], kept: int, delta: int, inv_freq: Tensor) -> None:
    """Rotates the keys of the first `kept` slots of `block_ids` (every layer and head) by ``-delta`` positions
    in place, with the model's RoPE inverse frequencies `inv_freq` (head_dim // 2,); math in float32."""
    bs, dim = int(pool.shape[3]), int(pool.shape[5])
    if len(block_ids) * bs < kept or kept < 0:
        raise ValueError(f"{len(block_ids)} blocks of {bs} cannot hold {kept} kept tokens")
    if tuple(inv_freq.shape) != (dim // 2,):
        raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}; expected ({dim // 2},) for head_dim {dim}")
    if delta == 0 or kept == 0:
        return
    angle = torch.cat((inv_freq, inv_freq)).float().to(pool.device) * float(delta)
    cos, sin = angle.cos(), angle.sin()
    blocks = torch.tensor(list(block_ids[: -(-kept // bs)]), dtype=torch.long, device=pool.device)
    keys = pool[blocks, :, 0].float()  # (blocks, layers, bs, heads, dim)
    shifted = (keys * cos - _rotate_half(keys) * sin).to(pool.dtype)
    slots = torch.arange(len(blocks) * bs, device=pool.device) < kept
    keep = slots.view(len(blocks), 1, bs, 1, 1)
    pool[blocks, :, 0] = torch.where(keep, shifted, pool[blocks, :, 0])
