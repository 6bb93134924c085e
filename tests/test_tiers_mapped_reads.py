"""Promoted blocks read by one kernel straight from page-locked host memory (`kernels.triton_host_copy`,
`load_records(..., hold=PinnedHold())`): the kernel against plain copies (CUDA, or Triton's interpreter on the CPU
with TRITON_INTERPRET=1, where host addresses are the tensors' own), and on CUDA the whole load path: exact
bytes, what was read and what decoded, ordering after work already queued, the hold letting go, refusals."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_tiers_pinned_load import BLOCK, IDENTITY, INT8, NS, blocks, key, pinning_tier

from ultra_adaptive_kv_cache_engine.tiers import encode_block
from ultra_adaptive_kv_cache_engine.tiers.block_io import LoadResult, load_records

ON_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") is not None
gpu = [pytest.mark.gpu, pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")]


@pytest.mark.gpu
@pytest.mark.skipif(not (ON_CUDA or INTERPRETED), reason="needs CUDA (or TRITON_INTERPRET=1 with triton)")
def test_the_kernel_copies_each_host_block_into_its_row_and_nothing_else() -> None:
    from ultra_adaptive_kv_cache_engine.kernels.triton_host_copy import CHUNK, WORD, _host_gather_kernel

    row_bytes = WORD * (CHUNK + 37)  # a partial last chunk
    gen = torch.Generator().manual_seed(3)
    sources = [torch.randint(0, 256, (row_bytes,), dtype=torch.uint8, generator=gen) for _ in range(5)]
    if ON_CUDA:
        sources = [s.pin_memory() for s in sources]
    device = "cuda" if ON_CUDA else "cpu"
    rows = torch.full((8, row_bytes), 0xAB, dtype=torch.uint8, device=device)
    ids = [6, 0, 3, 7, 2]
    table = torch.tensor([[s.data_ptr() for s in sources], ids], dtype=torch.int64, device=device)
    words = row_bytes // WORD
    _host_gather_kernel[(5, -(-words // CHUNK))](table[0], table[1], rows.view(torch.int32), words, CHUNK=CHUNK)
    rows = rows.cpu()
    for src, row in zip(sources, ids, strict=True):
        assert torch.equal(rows[row], src)
    assert bool((rows[[1, 4, 5]] == 0xAB).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_load_records_reads_pinned_payloads_by_kernel_and_decodes_the_rest(dtype: torch.dtype) -> None:
    from ultra_adaptive_kv_cache_engine.kernels.pinned_hold import PinnedHold

    source = blocks(4, dtype, seed=8)
    records = [encode_block(key(i), NS, source[i], INT8 if i == 2 and dtype == torch.float32 else IDENTITY)
               for i in range(4)]
    held = pinning_tier(records)
    pool = torch.full((6, *BLOCK), 5.0, dtype=dtype, device="cuda")
    expected = pool.clone()
    expected[[1, 4, 0, 5]] = torch.stack([h.tensor() for h in held]).cuda()
    hold = PinnedHold()
    torch.cuda.synchronize()
    torch.cuda._sleep(50_000_000)  # a slow kernel, then a write into the same slots: the reads land after them
    pool.index_fill_(0, torch.tensor([1, 4, 0, 5], device="cuda"), 7.0)
    direct = 3 if dtype == torch.float32 else 4
    assert load_records(pool, [1, 4, 0, 5], held, hold) == LoadResult(direct=direct, decoded=4 - direct)
    assert hold.release_done() <= 1
    assert torch.equal(pool, expected)
    torch.cuda.synchronize()
    assert hold.release_done() == 0


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_gather_host_blocks_refuses_misaligned_or_odd_sized_rows() -> None:
    from ultra_adaptive_kv_cache_engine.kernels.triton_host_copy import gather_host_blocks

    src = torch.zeros(64, dtype=torch.uint8).pin_memory()
    rows = torch.zeros((2, 32), dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="aligned"):
        gather_host_blocks(rows, [src.data_ptr() + 4], [0])
    with pytest.raises(ValueError, match="multiple of 16"):
        gather_host_blocks(torch.zeros((2, 24), dtype=torch.uint8, device="cuda"), [src.data_ptr()], [0])
    with pytest.raises(ValueError, match="2 addresses for 1 block ids"):
        gather_host_blocks(rows, [src.data_ptr(), src.data_ptr()], [0])
    torch.cuda.synchronize()
    assert float(rows.sum()) == 0
