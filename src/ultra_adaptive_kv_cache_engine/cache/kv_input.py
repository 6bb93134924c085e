"""Checks of what callers hand the cache manager (token ids, per-layer KV), the gather of one layer's KV out of
pool blocks, and a JSON view of tier usage."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch

from ..memory import KVSpec


def token_list(token_ids: Sequence[int] | torch.Tensor) -> list[int]:
    """`token_ids` as a list of Python ints; ValueError naming the first bad one."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.is_floating_point() or token_ids.dtype is torch.bool:
            raise ValueError(f"token_ids tensor of shape {tuple(token_ids.shape)} and dtype {token_ids.dtype}; "
                             "expected a 1-D integer tensor")
        return token_ids.tolist()
    if isinstance(token_ids, str | bytes) or not isinstance(token_ids, Sequence):
        raise ValueError(f"token_ids={token_ids!r} must be a sequence of integers")
    if isinstance(token_ids, list | tuple) and set(map(type, token_ids)) <= {int}:  # the common case, at C speed
        return list(token_ids)
    out: list[int] = []
    for position, token in enumerate(token_ids):
        if isinstance(token, bool):
            raise ValueError(f"token_ids[{position}]={token!r} must be an integer, not a boolean")
        try:
            out.append(operator.index(token))
        except TypeError:
            raise ValueError(f"token_ids[{position}]={token!r} must be an integer") from None
    return out



def check_kv(
    spec: KVSpec, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], count: int, reject_non_finite: bool
) -> None:
    """ValueError/TypeError unless keys[l]/values[l] are (num_kv_heads, count, head_dim) tensors of spec's dtype, one
    per layer (and finite when `reject_non_finite`)."""
    expected = (spec.num_kv_heads, count, spec.head_dim)
    for name, tensors in (("keys", keys), ("values", values)):
        if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
            raise TypeError(f"{name} must be a sequence of one tensor per layer, got {type(tensors).__name__}")
        if len(tensors) != spec.num_layers:
            raise ValueError(f"{name} has {len(tensors)} layer(s); expected {spec.num_layers}")
        for layer, tensor in enumerate(tensors):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}[{layer}] must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype != spec.dtype:
                raise TypeError(f"{name}[{layer}] has dtype {tensor.dtype}; expected {spec.dtype}")
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"{name}[{layer}] has shape {tuple(tensor.shape)}; expected {expected} "
                    "(num_kv_heads, len(token_ids), head_dim)"
                )
            if reject_non_finite and count and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{name}[{layer}] contains NaN or Inf; expected finite values")


def usage_dict(usage: Any) -> dict[str, Any]:
    """A JSON-friendly view of a TierUsage tree."""
    return {
        "name": usage.name, "capacity_bytes": usage.capacity_bytes, "used_bytes": usage.used_bytes,
        "blocks": usage.num_blocks, "read_only": usage.read_only, "healthy": usage.healthy,
        "last_error": usage.last_error, "counters": dict(usage.counters),
        "children": [usage_dict(c) for c in usage.children],
    }


def gather_layer(
    kv: torch.Tensor, spec: KVSpec, block_ids: list[int], num_tokens: int, layer: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of `layer` in pool blocks `block_ids`, first `num_tokens` tokens: contiguous
    (num_kv_heads, num_tokens, head_dim) each, in spec.dtype. ValueError for a layer out of range, or for a
    quantized pool (whose blocks are dequantised) when `num_tokens` does not fill the blocks."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < spec.num_layers:
        raise ValueError(f"layer={layer!r} is out of range; expected an int in [0, {spec.num_layers})")
    table = torch.tensor(block_ids, dtype=torch.long, device=kv.device)
    fmt = spec.quant_format
    if fmt is None:
        chunk = kv[:, layer].index_select(0, table)  # (blocks, 2, B, H, D)
    else:
        if num_tokens != len(block_ids) * spec.block_size:
            raise ValueError(f"{num_tokens} tokens in {len(block_ids)} blocks of a quantized pool: only sealed (full) "
                             "blocks live in the pool")
        slabs = kv[:, layer].index_select(0, table)  # (blocks, 2, slab)
        sizes = (spec.block_size, spec.num_kv_heads, spec.head_dim, spec.dtype)
        chunk = torch.stack([fmt.dequantize(slabs[:, i], i == 0, *sizes) for i in (0, 1)], dim=1)
    heads, dim = spec.num_kv_heads, spec.head_dim
    chunk = chunk.permute(1, 3, 0, 2, 4).reshape(2, heads, len(block_ids) * spec.block_size, dim)
    return chunk[0, :, :num_tokens].contiguous(), chunk[1, :, :num_tokens].contiguous()
