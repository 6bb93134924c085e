"""Triton: the matrix-vector products of a batch-1 decode step, with their neighbours fused in.

`triton_gemv(x, weight, prologue, norm_weight=None, eps=0.0, residual=None)` computes, for ONE token x (1, K)
and a weight (N, K) with contiguous rows, ``y = residual + f(x) @ weight.T`` in x's dtype, where f is
- `Prologue.NONE`: x itself;
- `Prologue.RMS_NORM`: RMSNorm of x by `norm_weight` (float32 statistics); the norm's scale is applied to the
  float32 sum at the end (one pass over x and the weight), so the normalised x is never rounded to x's dtype:
  within one rounding of ``linear(rms_norm(x))``;
- `Prologue.SILU_MUL`: ``silu(gate) * up`` of x = (1, 2K) holding gate then up, rounded as the PyTorch formula
  rounds (silu in x's dtype, then the product), so the vector multiplied is the formula's.
Each program owns BLOCK_N rows and walks all of K in BLOCK_K steps (no split-K: one launch, no partial sums),
accumulating in float32; the residual is added to the float32 result before the one rounding (as addmm does).
Where the PyTorch path takes a norm launch and a matrix product (or a SiLU-multiply launch and a product), this
is one launch. On CUDA the tile shape is autotuned per (N, K) on the first call (not under graph capture: the
first calls of a `DecodeStep` are its eager warm-up runs); the interpreter and weights under `TUNE_FROM`
elements use the first configuration.

This module imports triton at import time; import it only through `fused_decode_ops`.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl
from torch import Tensor

from .launch_plan import interpreting


class Prologue(enum.IntEnum):
    """What is done to the input vector before the product (module docstring)."""

    NONE = 0
    RMS_NORM = 1
    SILU_MUL = 2


#: (BLOCK_N, BLOCK_K, num_warps) tried per shape; the first is the interpreter's.
CONFIGS: tuple[tuple[int, int, int], ...] = ((8, 512, 4), (4, 1024, 4), (16, 512, 8), (8, 1024, 8))
#: Weights of fewer elements run the first configuration untuned (a tiny product is launch-bound anyway).
TUNE_FROM = 1 << 22


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, g_ptr, res_ptr, out_ptr, N, K, stride_w, eps,
    PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    ty = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    sq = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        if PROLOGUE == 2:
            gate = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + ks, mask=kmask, other=0.0).to(tl.float32)
            act = (gate / (1.0 + tl.exp(-gate))).to(ty).to(tl.float32)
            xv = (act * up).to(ty).to(tl.float32)
        else:
            xv = tl.load(x_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
            if PROLOGUE == 1:
                sq += xv * xv
                xv = xv * tl.load(g_ptr + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * stride_w + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc += w.to(tl.float32) * xv[None, :]
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1:
        y = y * (1.0 / tl.sqrt(tl.sum(sq, axis=0) / K + eps))
    if HAS_RES:
        y += tl.load(res_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, y.to(ty), mask=rmask)


_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS],
    key=["N", "K", "PROLOGUE", "HAS_RES"],
)(_gemv_kernel)


def triton_gemv(
    x: Tensor, weight: Tensor, prologue: Prologue, norm_weight: Tensor | None = None, eps: float = 0.0,
    residual: Tensor | None = None,
) -> Tensor:
    """``residual + f(x) @ weight.T`` for one token x (1, K), or (1, 2K) with `Prologue.SILU_MUL` (module docstring)."""
    n, k = (int(s) for s in weight.shape)
    width = 2 * k if prologue is Prologue.SILU_MUL else k
    if x.dim() != 2 or tuple(x.shape) != (1, width) or not x.is_contiguous():
        raise ValueError(f"x {tuple(x.shape)}: expected a contiguous (1, {width}) for a {prologue.name} product")
    if weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"weight {weight.dtype} strides {weight.stride()}: expected {x.dtype} with contiguous rows")
    if (prologue is Prologue.RMS_NORM) != (norm_weight is not None):
        raise ValueError(f"norm_weight is given exactly with Prologue.RMS_NORM (got {prologue.name})")
    if norm_weight is not None and tuple(norm_weight.shape) != (k,):
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)}: expected ({k},)")
    if residual is not None and (tuple(residual.shape) != (1, n) or not residual.is_contiguous()):
        raise ValueError(f"residual {tuple(residual.shape)}: expected a contiguous (1, {n})")
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    g = norm_weight if norm_weight is not None else x
    res = residual if residual is not None else out
    args = (x, weight, g, res, out, n, k, weight.stride(0), float(eps))
    if interpreting() or n * k < TUNE_FROM:
        bn, bk, _ = CONFIGS[0]
        _gemv_kernel[(triton.cdiv(n, bn),)](*args, PROLOGUE=int(prologue), HAS_RES=residual is not None,
                                           BLOCK_N=bn, BLOCK_K=bk)
    else:
        _tuned[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*args, PROLOGUE=int(prologue),
                                                               HAS_RES=residual is not None)
    return out
