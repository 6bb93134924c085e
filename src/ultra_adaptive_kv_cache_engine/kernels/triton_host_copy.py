"""Triton: many page-locked host blocks read straight into pool rows by ONE kernel (mapped reads over PCIe).

Page-locked host memory is mapped into the device's address space (unified addressing: the device reads it at
its host address), so a kernel can gather scattered host blocks itself: `_host_gather_kernel`, grid
(num_blocks, chunks), copies `CHUNK` 16-byte words of host block i (at `addresses[i]`) into pool row `ids[i]`.
One launch replaces one `copy_` per block (each a few microseconds of host time: a 16k-token prefix is a
thousand blocks), and the host queues it on the current stream with no side stream or event.

Callers guarantee: every address is page-locked memory of at least `row_bytes` bytes, 16-byte aligned, that
stays allocated and unchanged until the current stream has passed the launch (`kernels.pinned_hold`); ids are distinct
rows of the pool. Checked on the host: alignment and sizes (`gather_host_blocks`).

This module imports triton at import time; import it only where CUDA is in use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

WORD = 16  # bytes per element moved (int32 x 4 as one 128-bit access)
CHUNK = 1024  # words per program: 16 KiB


@triton.jit
def _host_gather_kernel(addr_ptr, ids_ptr, dst_ptr, row_words, CHUNK: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1)
    src = tl.load(addr_ptr + i).to(tl.pointer_type(tl.int32))
    row = tl.load(ids_ptr + i)
    offs = c * (CHUNK * 4) + tl.arange(0, CHUNK * 4)  # int32 elements, 4 to a word
    ok = offs < row_words * 4
    ptrs = tl.max_contiguous(tl.multiple_of(src + offs, 16), CHUNK * 4)  # 16-byte aligned rows (checked)
    x = tl.load(ptrs, mask=ok, other=0)
    tl.store(dst_ptr + row * (row_words * 4) + offs, x, mask=ok)


def gather_host_blocks(rows: Tensor, addresses: Sequence[int], block_ids: Sequence[int]) -> None:
    """Queue on the current stream: host block at `addresses[i]` -> `rows[block_ids[i]]` (rows: a contiguous
    (num_blocks, row_bytes) uint8 CUDA tensor). ValueError if a row is not a multiple of 16 bytes, an address
    is not 16-byte aligned, or the lengths differ (nothing is launched then)."""
    if rows.device.type != "cuda" or rows.dtype != torch.uint8 or rows.dim() != 2 or not rows.is_contiguous():
        raise ValueError("rows must be a contiguous (num_blocks, row_bytes) uint8 CUDA tensor")
    if len(addresses) != len(block_ids):
        raise ValueError(f"{len(addresses)} addresses for {len(block_ids)} block ids")
    row_bytes = int(rows.shape[1])
    if row_bytes % WORD:
        raise ValueError(f"rows of {row_bytes} bytes: mapped reads need a multiple of {WORD}")
    bad = [a for a in addresses if a % WORD]
    if bad:
        raise ValueError(f"host address {bad[0]:#x} is not {WORD}-byte aligned")
    if not addresses:
        return
    table = torch.tensor([list(addresses), [int(b) for b in block_ids]], dtype=torch.int64).pin_memory()
    table = table.to(rows.device, non_blocking=True)
    row_words = row_bytes // WORD
    grid = (len(addresses), triton.cdiv(row_words, CHUNK))
    _host_gather_kernel[grid](table[0], table[1], rows.view(torch.int32), row_words, CHUNK=CHUNK, num_warps=4)
