"""Input checks shared by every kernel: shapes, dtypes and devices, named in the error.

These checks read only tensor metadata (never tensor values), so they cost no device synchronisation and are
safe on the hot path. Checks that need values (block ids in range, lengths consistent) live in the reference
kernels only, which may synchronise.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Element types of KV and queries that the kernels accept (float64 only in the reference kernels).
KV_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Element types of block tables, lengths and offsets.
INDEX_DTYPES: tuple[torch.dtype, ...] = (torch.int32, torch.int64)


def require_tensor(name: str, value: object, ndim: int) -> Tensor:
    """`value` itself if it is a tensor with `ndim` dimensions; TypeError/ValueError naming `name` otherwise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def require_dtype(name: str, value: Tensor, allowed: tuple[torch.dtype, ...]) -> None:
    """ValueError naming `name` unless `value.dtype` is one of `allowed`."""
    if value.dtype not in allowed:
        valid = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(f"{name} has dtype {value.dtype}; expected one of: {valid}")


def require_like(name: str, value: Tensor, ref_name: str, ref: Tensor, same_dtype: bool = True) -> None:
    """ValueError unless `value` lives on `ref`'s device (and, if `same_dtype`, has its dtype)."""
    if value.device != ref.device:
        raise ValueError(f"{name} is on {value.device} but {ref_name} is on {ref.device}; expected the same device")
    if same_dtype and value.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {value.dtype} but {ref_name} has {ref.dtype}; expected the same dtype")


def require_shape(name: str, value: Tensor, expected: tuple[int, ...]) -> None:
    """ValueError unless `value.shape == expected`."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(value.shape)}; expected {tuple(expected)}")


def require_unit_last_stride(name: str, value: Tensor) -> None:
    """ValueError unless the last dimension is contiguous (stride 1), as the fast kernels load rows of it."""
    if value.shape[-1] > 1 and value.stride(-1) != 1:
        raise ValueError(f"{name} must have a contiguous last dimension (stride 1), got strides {value.stride()}")


def require_positive_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale to use: `scale`, or 1/sqrt(head_dim) when None; ValueError if not a positive number."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0:
        raise ValueError(f"scale={scale!r} must be a positive number or None")
    return float(scale)


def require_out(out: Tensor | None, shape: tuple[int, ...], like: Tensor) -> None:
    """ValueError unless `out` is None or a tensor of `shape` with `like`'s dtype and device."""
    if out is None:
        return
    require_tensor("out", out, len(shape))
    require_shape("out", out, shape)
    require_like("out", out, "query", like)


def require_query_starts(query_start_loc: object, batch: int) -> Tensor:
    """Metadata checks of prefill row offsets: a (batch + 1,) int32/int64 tensor."""
    starts = require_tensor("query_start_loc", query_start_loc, 1)
    require_dtype("query_start_loc", starts, INDEX_DTYPES)
    if starts.shape[0] != batch + 1:
        raise ValueError(f"query_start_loc has {starts.shape[0]} entries; expected batch + 1 = {batch + 1}")
    return starts
