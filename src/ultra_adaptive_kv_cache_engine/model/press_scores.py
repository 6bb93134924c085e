"""What a press reads of a prefilled prompt: per layer its keys, and the attention of the observation window.

SnapKV-style presses score the prompt by the attention of the queries of its last `window` tokens. The paged
forward keeps no queries, so `observe` recomputes them: it runs the window's tokens once more through every
layer of the `PagedLlama` (its weights; the layer's arithmetic restated here as `PagedLlama` computes it, so the
pool is never written), at their positions, with attention computed here in float32 over the prompt's KV as the
prefill left it (read through `read_kv`, full precision or dequantised), causal over the window. That attention,
softmax probabilities (q_heads, window, length), is both the press's observation and what carries the window's
hidden states to the next layer. Tests compare it with transformers' own attention probabilities.
Cost: `window` tokens of one forward plus (window x length) scores per layer, a small share of the prefill.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compression.presses import LayerObservation
from .kv_views import QuantPool
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


def dequantized_blocks(pool: QuantPool, row: Sequence[int], length: int) -> Tensor:
    """The blocks of a sequence of a quantized pool, in full precision: (ceil(length / bs), layers, 2, bs, heads,
    head_dim) in the staging dtype, from its kernel row (entries < N: sealed slabs, dequantised by the pool
    format; others: staging blocks, copied)."""
    bs, n = pool.block_size, pool.num_sealed
    entries = list(row[: -(-length // bs)])
    if len(entries) * bs < length:
        raise ValueError(f"a row of {len(entries)} blocks of {bs} cannot hold {length} tokens")
    out = torch.empty((len(entries), *pool.staging.shape[1:]), dtype=pool.staging.dtype, device=pool.device)
    sealed = [i for i, e in enumerate(entries) if e < n]
    staged = [i for i, e in enumerate(entries) if e >= n]
    if staged:
        ids = torch.tensor([entries[i] - n for i in staged], dtype=torch.long, device=pool.device)
        out[staged] = pool.staging.index_select(0, ids)
    if sealed:
        ids = torch.tensor([entries[i] for i in sealed], dtype=torch.long, device=pool.device)
        slabs = pool.pool.index_select(0, ids)  # (sealed, layers, 2, slab)
        layers, _, size, heads, dim = (int(d) for d in pool.staging.shape[1:])
        for kv in (0, 1):
            flat = slabs[:, :, kv].reshape(-1, slabs.shape[-1])
            dense = pool.format.dequantize(flat, kv == 0, size, heads, dim, pool.staging.dtype)
            out[sealed, :, kv] = dense.view(len(sealed), layers, size, heads, dim)
    return out


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


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.to(torch.float32)
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin[:, None]


def _window_layer(model: PagedLlama, layer: int, h: Tensor, rope: tuple[Tensor, Tensor], read_kv: KVReader
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """One decoder layer over the window's hidden states h (w, hidden), attending over the prompt's KV:
    (next hidden states, attention probabilities (q_heads, w, length), the prompt's keys)."""
    s, w = model.shape, model.layers[layer]
    t = h.shape[0]
    qkv = F.linear(_rms_norm(h, w.input_norm, s.rms_norm_eps), w.qkv, w.qkv_bias)
    q = _rotate(qkv[:, : s.num_heads * s.head_dim].view(t, s.num_heads, s.head_dim), *rope)
    keys, values = read_kv(layer)
    out, attention = _window_attention(q, keys, values, model.scale)
    h = h + F.linear(out.to(h.dtype).reshape(t, -1), w.o, w.o_bias)
    gate, up = F.linear(_rms_norm(h, w.post_norm, s.rms_norm_eps), w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    return h + F.linear(F.silu(gate) * up, w.down, w.down_bias), attention, keys


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
    ids = torch.tensor(list(prompt[length - window :]), dtype=torch.int64, device=model.device)
    with torch.no_grad():
        h = F.embedding(ids, model.embed)
        rope = model._rope(torch.arange(length - window, length, device=model.device))
        for layer in range(shape.num_layers):
            h, attention, keys = _window_layer(model, layer, h, rope, read_kv)
            yield LayerObservation(layer, length, shape.num_kv_heads, keys=keys.float() if need_keys else None,
                                   attention=attention)
