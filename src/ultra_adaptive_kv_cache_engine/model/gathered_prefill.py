"""Gathered prefill attention: few new tokens over a long cached prefix, through torch's SDPA.

The paged prefill kernel gives each program a tile of new tokens and one KV head and walks every cached key
alone, so 64 new tokens over a 16k-token prefix launch only a few dozen programs on a GPU of 132 SMs. Here,
per layer, the sequence's blocks (prefix and the new tokens' own, already written) are gathered into one
contiguous buffer (two `index_select`s into a buffer allocated once per prefill and reused by every layer),
and `F.scaled_dot_product_attention` attends with a lower-right causal bias: new token j (position
``start + j``) sees keys ``0 .. start + j``, i.e. the whole prefix and the earlier new tokens. On CUDA in
half precision that is FlashAttention, which splits long key ranges over many programs.

`PrefillPath` names the two ways; `GatherRule` picks one from the sizes (few new tokens, long prefix).

Invariants: nothing here reads a device value on the host (no synchronisation): the buffer's size comes from
host ints (``start + T`` and the block size); the block table must cover positions ``0 .. start + T - 1``
(``table[p // block_size]``); its entries past those blocks are never read. The result equals the paged
kernel's up to rounding (tests: 1e-5 in float32 on CPU, 1e-2 in bfloat16 on CUDA).
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, causal_lower_right

#: Whether this torch's causal bias forwards `enable_gqa` (newer releases); otherwise K/V heads are repeated.
_BIAS_TAKES_GQA = "enable_gqa" in inspect.signature(CausalBias._dispatch).parameters

#: attend(layer, q, k, v) -> (tokens, q_heads, head_dim), the shape of `PagedLlama._layer`'s callback.
Attend = Callable[[int, Tensor, Tensor, Tensor], Tensor]


class PrefillPath(enum.Enum):
    """How a prefill with a cached prefix attends."""

    KERNEL = "kernel"  # the backend's paged prefill kernel, straight over the pool
    GATHERED = "gathered"  # the sequence's blocks gathered per layer, then SDPA with a lower-right causal bias


def _require_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r} must be a non-negative int")


@dataclass(frozen=True)
class GatherRule:
    """Take the gathered path when at most `max_new_tokens` new tokens attend to at least `min_prefix_tokens`
    cached ones (where the kernel launches too few programs); the kernel path otherwise."""

    max_new_tokens: int = 512
    min_prefix_tokens: int = 1024

    def __post_init__(self) -> None:
        _require_count("max_new_tokens", self.max_new_tokens)
        _require_count("min_prefix_tokens", self.min_prefix_tokens)

    def choose(self, new_tokens: int, prefix_tokens: int) -> PrefillPath:
        gathered = new_tokens <= self.max_new_tokens and prefix_tokens >= self.min_prefix_tokens
        return PrefillPath.GATHERED if gathered else PrefillPath.KERNEL


def gathered_attention(pool: Tensor, table: Tensor, start: int, new_tokens: int, scale: float) -> Attend:
    """The attend callback of one prefill of `new_tokens` tokens at positions ``start ..`` of the sequence
    whose block table (device, int32/int64) is `table`, over the block-major `pool` (num_blocks, layers, 2,
    block_size, kv_heads, head_dim). Call it after the layer's new KV is written (as `PagedLlama._layer` does).
    """
    block_size, kv_heads, head_dim = (int(x) for x in pool.shape[3:])
    total = start + new_tokens
    blocks = -(-total // block_size)
    ids = table[:blocks]
    buffer = torch.empty((2, blocks, block_size, kv_heads, head_dim), dtype=pool.dtype, device=pool.device)
    keys = buffer[0].view(blocks * block_size, kv_heads, head_dim)[:total].transpose(0, 1)[None]  # (1, H, S, D)
    values = buffer[1].view(blocks * block_size, kv_heads, head_dim)[:total].transpose(0, 1)[None]
    bias = causal_lower_right(new_tokens, total)

    def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        torch.index_select(pool[:, i, 0], 0, ids, out=buffer[0])
        torch.index_select(pool[:, i, 1], 0, ids, out=buffer[1])
        group = q.shape[1] // kv_heads
        query = q.transpose(0, 1)[None]  # (1, q_heads, T, D)
        if group == 1:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale)
        elif _BIAS_TAKES_GQA:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=bias, scale=scale, enable_gqa=True)
        else:
            rk, rv = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(query, rk, rv, attn_mask=bias, scale=scale)
        return out[0].transpose(0, 1)

    return attend
