"""The kernel registry: backend name -> factory of a `KernelBackend` (the six kernels of one implementation).

Backends: "reference" (plain PyTorch, any device, checks values) and "triton" (CUDA; triton imported only
when this backend is built, so the package works without triton). `select_backend(device)` picks "triton"
on CUDA when triton is importable, else "reference". An unknown name raises ValueError listing the valid
ones; asking for "triton" without triton installed raises RuntimeError saying so.

Every backend has the same signatures (see `reference_attention` and `reference_blocks` for semantics):
  decode_attention(query, kv, scale=None, out=None) -> Tensor
  prefill_attention(query, query_start_loc, kv, max_query_len=None, scale=None, out=None) -> Tensor
  write_kv(key, value, key_cache, value_cache, slot_mapping) -> None
  gather_blocks(pool, block_ids, out=None) -> Tensor
  scatter_blocks(staging, pool, block_ids) -> None
  seal_blocks(staging, staging_ids, pool, block_ids, format) -> None   (quantize on write, quantized pools)
and `prepare(kv) -> PagedKV`, called once per forward on the first layer's view: the reference backend checks
the value invariants there (`PagedKV.checked`, one host synchronisation) so that its per-layer calls skip them;
the Triton backend returns the view as it is (it never reads values on the host).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..compression.pool_formats import PoolFormat
from .paged_kv import PagedKV
from .reference_attention import reference_decode_attention, reference_prefill_attention
from .reference_blocks import (
    reference_gather_blocks,
    reference_scatter_blocks,
    reference_seal_blocks,
    reference_write_kv,
)


class DecodeAttention(Protocol):
    def __call__(self, query: Tensor, kv: PagedKV, scale: float | None = None, out: Tensor | None = None) -> Tensor: ...


class PrefillAttention(Protocol):
    def __call__(
        self, query: Tensor, query_start_loc: Tensor, kv: PagedKV, max_query_len: int | None = None,
        scale: float | None = None, out: Tensor | None = None,
    ) -> Tensor: ...


class WriteKV(Protocol):
    def __call__(self, key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor) -> None: ...


class GatherBlocks(Protocol):
    def __call__(self, pool: Tensor, block_ids: Tensor, out: Tensor | None = None) -> Tensor: ...


class ScatterBlocks(Protocol):
    def __call__(self, staging: Tensor, pool: Tensor, block_ids: Tensor) -> None: ...


class SealBlocks(Protocol):
    def __call__(self, staging: Tensor, staging_ids: Tensor, pool: Tensor, block_ids: Tensor,
                 format: PoolFormat) -> None: ...


def _as_is(kv: PagedKV) -> PagedKV:
    return kv


def _checked(kv: PagedKV) -> PagedKV:
    return kv.checked()


@dataclass(frozen=True)
class KernelBackend:
    """One implementation of every kernel; immutable, so it can be shared freely."""

    name: str
    decode_attention: DecodeAttention
    prefill_attention: PrefillAttention
    write_kv: WriteKV
    gather_blocks: GatherBlocks
    scatter_blocks: ScatterBlocks
    seal_blocks: SealBlocks = reference_seal_blocks
    prepare: Callable[[PagedKV], PagedKV] = _as_is


def triton_available() -> bool:
    """Whether the `triton` package can be imported (no import is done)."""
    return importlib.util.find_spec("triton") is not None


def _reference_backend() -> KernelBackend:
    return KernelBackend(
        "reference", reference_decode_attention, reference_prefill_attention, reference_write_kv,
        reference_gather_blocks, reference_scatter_blocks, reference_seal_blocks, _checked,
    )


def _triton_backend() -> KernelBackend:
    if not triton_available():
        raise RuntimeError("the 'triton' kernel backend needs the triton package (pip install triton) and CUDA")
    from .triton_blocks import triton_gather_blocks, triton_scatter_blocks, triton_write_kv
    from .triton_decode import triton_decode_attention
    from .triton_prefill import triton_prefill_attention
    from .triton_seal import triton_seal_blocks

    return KernelBackend(
        "triton", triton_decode_attention, triton_prefill_attention, triton_write_kv,
        triton_gather_blocks, triton_scatter_blocks, triton_seal_blocks,
    )


BACKENDS: dict[str, Callable[[], KernelBackend]] = {
    "reference": _reference_backend,
    "triton": _triton_backend,
}


def register_backend(name: str, factory: Callable[[], KernelBackend]) -> None:
    """Register `factory` under `name` (lower-case); re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name {name!r} must be a non-empty string")
    if not callable(factory):
        raise ValueError(f"backend factory {factory!r} must be callable")
    BACKENDS[name.lower()] = factory


def get_backend(name: str) -> KernelBackend:
    """The backend registered under `name`."""
    factory = BACKENDS.get(str(name).lower())
    if factory is None:
        raise ValueError(f"unknown kernel backend {name!r}; expected one of: {', '.join(sorted(BACKENDS))}")
    return factory()


def select_backend(device: torch.device | str) -> KernelBackend:
    """The fastest backend for `device`: "triton" on CUDA when triton is importable, else "reference"."""
    device = torch.device(device)
    if device.type == "cuda" and triton_available():
        return get_backend("triton")
    return get_backend("reference")
