"""Pieces shared by the Triton kernels: dot product and online-softmax helpers, the dtypes they take, the SM count.

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch_plan import DEFAULT_NUM_SMS, interpreting

#: Element types the Triton attention kernels take (float64 stays with the reference kernels).
FAST_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def mma(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation. IEEE: multiply in float32 without TF32, for float32 inputs and for
    the interpreter (whose half-precision dot products are unreliable)."""
    if IEEE:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def softmax_update(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One online-softmax step (base 2): fold scores s (rows x keys, -inf where masked, at least one finite
    per row) and their values v (keys x dim) into the running max m_i, sum l_i and unnormalised acc.
    Probabilities are rounded to v's dtype before P@V, as FlashAttention does."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc


def ieee_dot(dtype: torch.dtype) -> bool:
    """Whether `mma` must run in IEEE float32 for inputs of `dtype` here."""
    return dtype == torch.float32 or interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a default for the interpreter on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return DEFAULT_NUM_SMS
