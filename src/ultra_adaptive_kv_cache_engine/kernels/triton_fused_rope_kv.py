"""Triton: RoPE of a decoder layer's queries and keys and the KV store into the paged caches, in ONE launch.

`triton_rope_write_kv(qkv, cos, sin, num_heads, num_kv_heads, key_cache, value_cache, slots)` takes the fused
q/k/v projection (tokens, (q_heads + 2 * kv_heads) * head_dim), rotates every query and key head with cos/sin
(tokens, head_dim) in the model's dtype, returns the rotated queries (tokens, q_heads, head_dim) and writes the
rotated keys and the values into their slots of one layer's caches (num_blocks, block_size, kv_heads, head_dim).
Where the PyTorch formula (`fused_decode_ops.rope_write_kv_torch`) takes five launches for the rotation and one
for the store.

Numbers: the rotation rounds as the formula ``x * cos + cat(-x2, x1) * sin`` does in the model's dtype (each
product rounded, then the sum); the compiler may still contract a product and the sum into one FMA, so the
result is within one rounding of the formula's (bit-equal under the interpreter; 1-ulp differences on an H200). Grid (tokens, q_heads + kv_heads): a program rotates one head of one token; the programs of key heads
also copy that head's value. Slots outside [0, num_blocks * block_size) are skipped, as `triton_write_kv` does.

This module imports triton at import time; import it only through `fused_decode_ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rope_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr, num_slots,
    stride_t, stride_ct, stride_st, stride_qt,
    stride_kcn, stride_kct, stride_kch, stride_vcn, stride_vct, stride_vch,
    Q_HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK)
    dm = d < HALF
    row = qkv_ptr + i * stride_t + h * (2 * HALF)
    x1 = tl.load(row + d, mask=dm, other=0.0)
    x2 = tl.load(row + HALF + d, mask=dm, other=0.0)
    c1 = tl.load(cos_ptr + i * stride_ct + d, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + i * stride_ct + HALF + d, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + i * stride_st + d, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + i * stride_st + HALF + d, mask=dm, other=0.0).to(tl.float32)
    ty = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    # as the formula rounds: x * cos and rotated * sin each in the model's dtype, then their sum
    o1 = ((a1 * c1).to(ty).to(tl.float32) + (-a2 * s1).to(ty).to(tl.float32)).to(ty)
    o2 = ((a2 * c2).to(ty).to(tl.float32) + (a1 * s2).to(ty).to(tl.float32)).to(ty)
    if h < Q_HEADS:
        out = q_ptr + i * stride_qt + h * (2 * HALF)
        tl.store(out + d, o1, mask=dm)
        tl.store(out + HALF + d, o2, mask=dm)
    else:
        kh = h - Q_HEADS
        slot = tl.load(slot_ptr + i).to(tl.int64)
        keep = d < tl.where((slot >= 0) & (slot < num_slots), HALF, 0)  # an out-of-range slot writes nothing
        blk = slot // PAGE
        off = slot % PAGE
        kc = kc_ptr + blk * stride_kcn + off * stride_kct + kh * stride_kch
        tl.store(kc + d, o1, mask=keep)
        tl.store(kc + HALF + d, o2, mask=keep)
        vrow = qkv_ptr + i * stride_t + (Q_HEADS + KV_HEADS + kh) * (2 * HALF)
        vc = vc_ptr + blk * stride_vcn + off * stride_vct + kh * stride_vch
        tl.store(vc + d, tl.load(vrow + d, mask=dm, other=0.0), mask=keep)
        tl.store(vc + HALF + d, tl.load(vrow + HALF + d, mask=dm, other=0.0), mask=keep)


def triton_rope_write_kv(
    qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int, key_cache: Tensor,
    value_cache: Tensor, slots: Tensor,
) -> Tensor:
    """Rotated queries (tokens, num_heads, head_dim); rotated keys and values written in place (module docstring)."""
    tokens = int(qkv.shape[0])
    dim = int(key_cache.shape[-1])
    width = (num_heads + 2 * num_kv_heads) * dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} strides {qkv.stride()}: expected (tokens, {width}), rows contiguous")
    if dim % 2 or tuple(key_cache.shape[2:]) != (num_kv_heads, dim) or value_cache.shape != key_cache.shape:
        raise ValueError(f"caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)}: expected (blocks, page, "
                         f"{num_kv_heads}, even head_dim) alike")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (tokens, dim) or t.stride(1) != 1:
            raise ValueError(f"{name} {tuple(t.shape)}: expected ({tokens}, {dim}) with contiguous rows")
    if tuple(slots.shape) != (tokens,) or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        raise ValueError(f"slots {tuple(slots.shape)} for {tokens} tokens, or caches with a strided last dimension")
    q = torch.empty((tokens, num_heads, dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    kc, vc = key_cache, value_cache
    _rope_kv_kernel[(tokens, num_heads + num_kv_heads)](
        qkv, cos, sin, q, kc, vc, slots, kc.shape[0] * kc.shape[1],
        qkv.stride(0), cos.stride(0), sin.stride(0), q.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        Q_HEADS=num_heads, KV_HEADS=num_kv_heads, HALF=dim // 2, PAGE=int(kc.shape[1]),
        BLOCK=triton.next_power_of_2(dim // 2), num_warps=1,
    )
    return q
