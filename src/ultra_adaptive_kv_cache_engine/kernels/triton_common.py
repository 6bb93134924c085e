"""Pieces shared by the Triton kernels: the dot product helper, the dtypes they take, the SM count.

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


def ieee_dot(dtype: torch.dtype) -> bool:
    """Whether `mma` must run in IEEE float32 for inputs of `dtype` here."""
    return dtype == torch.float32 or interpreting()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (a default for the interpreter on CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return DEFAULT_NUM_SMS
