"""Plain-PyTorch compaction of a pressed sequence: the kept tokens of its paged blocks into destination blocks.

`reference_compact_kv(pool, src_table, kept, dst_block_ids)`: for every layer l, KV head h and slot j < k,
the key and the value of token ``t = kept[l, h, j]`` of the sequence (block ``src_table[t // block_size]``,
offset ``t % block_size``) go to block ``dst_block_ids[j // block_size]`` at offset ``j % block_size`` of
`dst_pool` (the same pool when None), same layer, same head. Everything is read before anything is written,
so destination blocks may be source blocks. Slots of the last destination block past k are not written.
Pools have the unquantized block-major layout (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim);
any device. Bit-exact copies; every index is checked (this may synchronise with the device).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import INDEX_DTYPES, require_dtype, require_like, require_shape, require_tensor


def _require_ids(name: str, ids: Tensor, bound: int, distinct: bool) -> None:
    bad = (ids < 0) | (ids >= bound)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}]={int(ids[i])} is not a block id in [0, {bound})")
    if distinct and ids.unique().numel() != ids.numel():
        raise ValueError(f"{name} holds a block twice; expected distinct destination blocks")


def check_compact_inputs(pool: Tensor, src_table: Tensor, kept: Tensor, dst_block_ids: Tensor, dst_pool: Tensor) -> None:
    """Shape, dtype, device and range checks of `reference_compact_kv`'s arguments."""
    require_tensor("pool", pool, 6)
    require_tensor("src_table", src_table, 1)
    require_tensor("kept", kept, 3)
    require_tensor("dst_block_ids", dst_block_ids, 1)
    for name, ids in (("src_table", src_table), ("kept", kept), ("dst_block_ids", dst_block_ids)):
        require_dtype(name, ids, INDEX_DTYPES)
        require_like(name, ids, "pool", pool, same_dtype=False)
    require_like("dst_pool", dst_pool, "pool", pool)
    require_shape("dst_pool", dst_pool, (int(dst_pool.shape[0]), *pool.shape[1:]))
    layers, heads, bs = int(pool.shape[1]), int(pool.shape[4]), int(pool.shape[3])
    if pool.shape[2] != 2 or tuple(kept.shape[:2]) != (layers, heads):
        raise ValueError(f"kept has shape {tuple(kept.shape)} for a pool {tuple(pool.shape)}; expected "
                         f"({layers}, {heads}, k) and a pool (blocks, layers, 2, block_size, heads, head_dim)")
    k = int(kept.shape[2])
    if k < 1 or int(dst_block_ids.shape[0]) != -(-k // bs):
        raise ValueError(f"{k} kept tokens need {-(-k // bs)} destination block(s) of {bs}, got "
                         f"{int(dst_block_ids.shape[0])}")
    _require_ids("src_table", src_table, int(pool.shape[0]), distinct=False)
    _require_ids("dst_block_ids", dst_block_ids, int(dst_pool.shape[0]), distinct=True)
    bound = int(src_table.shape[0]) * bs
    bad = (kept < 0) | (kept >= bound)
    if bool(bad.any()):
        layer, h, j = (int(x) for x in bad.nonzero()[0].tolist())
        raise ValueError(f"kept[{layer}, {h}, {j}]={int(kept[layer, h, j])} is not a token of a {bound}-slot source table")


def reference_compact_kv(
    pool: Tensor, src_table: Tensor, kept: Tensor, dst_block_ids: Tensor, dst_pool: Tensor | None = None
) -> None:
    """Writes the kept tokens' K and V into the destination blocks (see the module docstring)."""
    dst_pool = pool if dst_pool is None else dst_pool
    check_compact_inputs(pool, src_table, kept, dst_block_ids, dst_pool)
    layers, bs, heads = int(pool.shape[1]), int(pool.shape[3]), int(pool.shape[4])
    kept = kept.long()
    layer_ix = torch.arange(layers, device=pool.device)[:, None, None]
    head_ix = torch.arange(heads, device=pool.device)[None, :, None]
    src_blocks = src_table.long()[kept // bs]
    rows = pool[src_blocks, layer_ix, :, kept % bs, head_ix]  # (L, H, k, 2, D): a copy, read before writing
    slots = torch.arange(int(kept.shape[2]), device=pool.device)
    dst_blocks = dst_block_ids.long()[slots // bs][None, None]
    dst_pool[dst_blocks, layer_ix, :, (slots % bs)[None, None], head_ix] = rows
