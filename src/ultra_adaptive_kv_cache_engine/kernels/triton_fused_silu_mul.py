"""Triton: the gated MLP's ``silu(gate) * up`` in ONE launch (PyTorch takes two: the SiLU, then the product).

`triton_silu_mul(gate_up)` takes (tokens, 2 * I) holding gate then up per row and returns (tokens, I) in its
dtype, rounded as the formula ``F.silu(gate) * up`` rounds (the SiLU in the input's dtype, then the product).
Grid (tokens, cdiv(I, BLOCK)). Used for decode batches above one token (one token goes through
`triton_gemv`'s SILU_MUL prologue instead, fused into the down projection).

This module imports triton at import time; import it only through `fused_decode_ops`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inner, stride_x, stride_o, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(x_ptr + i * stride_x + cols, mask=mask, other=0.0)
    ty = gate.dtype
    g = gate.to(tl.float32)
    up = tl.load(x_ptr + i * stride_x + inner + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(ty).to(tl.float32)
    tl.store(out_ptr + i * stride_o + cols, (act * up).to(ty), mask=mask)


def triton_silu_mul(gate_up: Tensor) -> Tensor:
    """``silu(gate) * up`` of (tokens, 2 * I) rows holding gate then up; returns (tokens, I)."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up {tuple(gate_up.shape)} strides {gate_up.stride()}: expected (tokens, 2 * I), "
                         "rows contiguous")
    tokens, inner = int(gate_up.shape[0]), int(gate_up.shape[1]) // 2
    out = torch.empty((tokens, inner), dtype=gate_up.dtype, device=gate_up.device)
    if tokens and inner:
        _silu_mul_kernel[(tokens, triton.cdiv(inner, _BLOCK))](gate_up, out, inner, gate_up.stride(0), out.stride(0),
                                                               BLOCK=_BLOCK, num_warps=4)
    return out
