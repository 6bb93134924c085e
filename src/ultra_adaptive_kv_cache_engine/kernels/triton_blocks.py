"""Triton block movement, the fast twins of `reference_blocks`: slot writes, block gather and scatter.

- `_write_kv_kernel`, grid (num_tokens,): copies one token's (kv_heads, head_dim) key and value rows into
  their slot. Slots outside [0, num_blocks * block_size) are skipped (never written out of bounds); the
  values are not checked on the host (no synchronisation).
- `_copy_blocks_kernel`, grid (num_ids, chunks): copies whole blocks between a pool and a contiguous staging
  tensor, both viewed as rows of `block_numel` raw integers of the element's width, so the copy is bit-exact
  for every dtype. Gather reads rows ``ids[i]`` of the pool into row i; scatter does the reverse. Ids
  outside [0, num_blocks) are skipped (their staging row is left as it was); values are not checked on the
  host.

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference_blocks import check_block_ids, check_staging, check_write_inputs

_RAW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_COPY_CHUNK = 4096  # elements per program: 8 KiB of bf16


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcn, stride_kct, stride_kch, stride_vcn, stride_vct, stride_vch,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + i).to(tl.int64)
    in_range = (slot >= 0) & (slot < num_slots)
    blk = slot // PAGE
    off = slot % PAGE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    heads = tl.where(in_range, HEADS, 0)  # an out-of-range slot copies nothing
    mask = (h[:, None] < heads) & (d[None, :] < HEAD_DIM)
    key = tl.load(k_ptr + i * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    value = tl.load(v_ptr + i * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    kc = kc_ptr + blk * stride_kcn + off * stride_kct + h[:, None] * stride_kch + d[None, :]
    vc = vc_ptr + blk * stride_vcn + off * stride_vct + h[:, None] * stride_vch + d[None, :]
    tl.store(kc, key, mask=mask)
    tl.store(vc, value, mask=mask)


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, ids_ptr, block_numel, num_blocks, GATHER: tl.constexpr, CHUNK: tl.constexpr
):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    blk = tl.load(ids_ptr + i).to(tl.int64)
    limit = tl.where((blk >= 0) & (blk < num_blocks), block_numel, 0)  # an out-of-range id copies nothing
    mask = offs < limit
    if GATHER:
        src_row = blk
        dst_row = i
    else:
        src_row = i
        dst_row = blk
    x = tl.load(src_ptr + src_row * block_numel + offs, mask=mask)
    tl.store(dst_ptr + dst_row * block_numel + offs, x, mask=mask)


def _raw(t: Tensor) -> Tensor:
    """`t` reinterpreted as integers of the same width (a bit-exact copy needs no float arithmetic)."""
    return t.view(_RAW[t.element_size()])


def triton_write_kv(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None:
    """Write each token's K and V into its slot of one layer's caches (in place); see the module docstring."""
    check_write_inputs(key, value, key_cache, value_cache, slot_mapping)
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension, got strides {t.stride()}")
    tokens, heads, dim = (int(x) for x in key.shape)
    if tokens == 0:
        return
    kc, vc, k, v = _raw(key_cache), _raw(value_cache), _raw(key), _raw(value)
    _write_kv_kernel[(tokens,)](
        k, v, kc, vc, slot_mapping, key_cache.shape[0] * key_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        HEADS=heads, HEAD_DIM=dim, PAGE=int(key_cache.shape[1]),
        BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim),
        num_warps=4,
    )


def _launch_copy(src: Tensor, dst: Tensor, block_ids: Tensor, gather: bool) -> None:
    count = int(block_ids.shape[0])
    pool = src if gather else dst
    block_numel = pool[0].numel() if pool.shape[0] else 0
    if count == 0 or block_numel == 0:
        return
    grid = (count, triton.cdiv(block_numel, _COPY_CHUNK))
    _copy_blocks_kernel[grid](
        _raw(src), _raw(dst), block_ids, block_numel, int(pool.shape[0]),
        GATHER=gather, CHUNK=_COPY_CHUNK, num_warps=4,
    )


def triton_gather_blocks(pool: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor:
    """``pool[block_ids]`` into one contiguous tensor (`out` when given); returns it."""
    check_block_ids(block_ids, pool)
    if out is None:
        out = torch.empty((block_ids.shape[0], *pool.shape[1:]), dtype=pool.dtype, device=pool.device)
    check_staging("out", out, pool, int(block_ids.shape[0]))
    _launch_copy(pool, out, block_ids, gather=True)
    return out


def triton_scatter_blocks(staging: Tensor, pool: Tensor, block_ids: Tensor) -> None:
    """``pool[block_ids[i]] = staging[i]`` (in place); ids must be distinct (not checked)."""
    check_block_ids(block_ids, pool)
    check_staging("staging", staging, pool, int(block_ids.shape[0]))
    _launch_copy(staging, pool, block_ids, gather=False)
