"""What a press reads of a prefilled prompt: per layer its keys, and the attention of the observation window.

SnapKV-style presses score the prompt by the attention of the queries of its last `window` tokens. The paged
forward keeps no queries, so `observe` recomputes them: it runs the window's tokens once more through every
layer of the `PagedLlama` (the same weights and layer code, `PagedLlama._layer`), at their positions, with
attention computed here in float32 over the prompt's KV as the prefill left it in the pool (read through
`read_kv`, full precision or dequantised), causal over the window. That attention, softmax probabilities
(q_heads, window, length), is both the press's observation and what carries the window's hidden states to the
next layer. The layer's KV writes go to a scratch pool of the window's size: the pool is never written.
Cost: `window` tokens of one forward plus (window x length) scores per layer, a small share of the prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compression.presses import LayerObservation
from .paged_llama import PagedLlama

#: layer -> (keys, values), each (length, kv_heads, head_dim) in the model dtype, of the prompt's tokens in order.
KVReader = Callable[[int], tuple[Tensor, Tensor]]


def pool_reader(pool: Tensor, table: Sequence[int], length: int) -> KVReader:
    """Reads a sequence's first `length` tokens of KV from a full-precision block-major pool through its table."""
    bs = int(pool.shape[3])
    if len(table) * bs < length:
        raise ValueError(f"a table of {len(table)} blocks of {bs} cannot hold {length} tokens")
    blocks = torch.tensor(list(table[: -(-length // bs)]), dtype=torch.long, device=pool.device)

    def read(layer: int) -> tuple[Tensor, Tensor]:
        kv = pool[:, layer].index_select(0, blocks)  # (blocks, 2, bs, heads, dim)
        keys = kv[:, 0].reshape(-1, *kv.shape[3:])[:length]
        values = kv[:, 1].reshape(-1, *kv.shape[3:])[:length]
        return keys, values

    return read


def _window_attention(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention of the window's queries q (w, Hq, D), the last w of the L positions of keys/values
    (L, Hkv, D): returns (output (w, Hq, D) in float32, probabilities (Hq, w, L) in float32)."""
    w, q_heads, dim = (int(x) for x in q.shape)
    length, kv_heads = int(keys.shape[0]), int(keys.shape[1])
    group = q_heads // kv_heads
    qg = q.float().view(w, kv_heads, group, dim).permute(1, 2, 0, 3)  # (Hkv, g, w, D)
    logits = qg @ keys.float().permute(1, 2, 0)[:, None] * scale  # (Hkv, g, w, L)
    rows = torch.arange(length - w, length, device=q.device)[:, None]
    logits = logits.masked_fill(torch.arange(length, device=q.device)[None, :] > rows, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = probs @ values.float().permute(1, 0, 2)[:, None]  # (Hkv, g, w, D)
    return out.permute(2, 0, 1, 3).reshape(w, q_heads, dim), probs.reshape(q_heads, w, length)


def observe(
    model: PagedLlama, read_kv: KVReader, prompt: Sequence[int], window: int, need_keys: bool = False
) -> Iterator[LayerObservation]:
    """One `LayerObservation` per layer, in order, of the prefilled `prompt` (its KV readable by `read_kv`):
    the attention of its last `window` tokens (none when window is 0) and its keys when `need_keys`."""
    length, shape = len(prompt), model.shape
    if not 0 <= window <= length:
        raise ValueError(f"window={window!r} must be in [0, {length}] (the prompt length)")
    if window == 0:
        for layer in range(shape.num_layers):
            keys = read_kv(layer)[0].float() if need_keys else None
            yield LayerObservation(layer, length, shape.num_kv_heads, keys=keys)
        return
    device = model.device
    ids = torch.tensor(list(prompt[length - window :]), dtype=torch.int64, device=device)
    positions = torch.arange(length - window, length, device=device)
    scratch = torch.empty((1, shape.num_layers, 2, window, shape.num_kv_heads, shape.head_dim),
                          dtype=model.dtype, device=device)
    slots = torch.arange(window, device=device)
    seen: dict[str, Tensor] = {}

    def attend(layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        keys, values = read_kv(layer)
        out, seen["attention"] = _window_attention(q, keys, values, model.scale)
        seen["keys"] = keys
        return out.to(q.dtype)

    with torch.no_grad():
        h = F.embedding(ids, model.embed)
        rope = model._rope(positions)
        for layer in range(shape.num_layers):
            h = model._layer(h, layer, scratch, slots, rope, attend)
            keys = seen["keys"].float() if need_keys else None
            yield LayerObservation(layer, length, shape.num_kv_heads, keys=keys, attention=seen["attention"])
