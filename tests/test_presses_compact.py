"""`reference_compact_kv`: which source token lands in which destination slot, in a tiny world (blocks of 4
tokens, 2 layers, 2 KV heads, head_dim 1 holding the token's own id), and the refusals."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.kernels.reference_compact import reference_compact_kv

BS, LAYERS, HEADS = 4, 2, 2
TABLE = [6, 2, 9]  # a 12-token sequence: tokens 0-3 in block 6, 4-7 in block 2, 8-11 in block 9


def world(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An 11-block pool whose every slot holds 64 * layer + 32 * kv + 16 * head + token (NaN
    elsewhere; exact in bfloat16 too)."""
    pool = torch.full((11, LAYERS, 2, BS, HEADS, 1), float("nan"), dtype=dtype)
    for token in range(12):
        block, offset = TABLE[token // BS], token % BS
        for layer in range(LAYERS):
            for kv in range(2):
                for head in range(HEADS):
                    pool[block, layer, kv, offset, head, 0] = 64 * layer + 32 * kv + 16 * head + token
    return pool


def slot_tokens(pool: torch.Tensor, blocks: list[int], count: int, layer: int, kv: int, head: int) -> list[int]:
    """The token ids held by the first `count` slots of `blocks` (decoded from the marker values)."""
    flat = pool[blocks, layer, kv, :, head, 0].reshape(-1)[:count]
    return [int(v) - 64 * layer - 32 * kv - 16 * head for v in flat.tolist()]


KEPT = torch.tensor([
    [[0, 1, 5, 10, 11], [0, 3, 4, 8, 11]],  # layer 0: head 0, head 1
    [[2, 6, 7, 9, 11], [0, 1, 2, 3, 11]],   # layer 1
])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_each_kept_token_lands_in_its_slot_of_the_destination_blocks(dtype):
    pool = world(dtype)
    before = pool.clone()
    reference_compact_kv(pool, torch.tensor(TABLE), KEPT, torch.tensor([4, 0]))
    for layer in range(LAYERS):
        for head in range(HEADS):
            for kv in range(2):  # keys and values alike
                assert slot_tokens(pool, [4, 0], 5, layer, kv, head) == KEPT[layer, head].tolist()
    assert torch.isnan(pool[0, :, :, 1:]).all()  # slots past the kept ones are not written
    untouched = [b for b in range(11) if b not in (4, 0)]
    assert torch.equal(pool[untouched].nan_to_num(-1), before[untouched].nan_to_num(-1))  # sources kept


def test_destination_blocks_may_be_the_source_blocks():
    pool = world()
    reference_compact_kv(pool, torch.tensor(TABLE), KEPT, torch.tensor([2, 6]))  # the sequence's own blocks
    assert slot_tokens(pool, [2, 6], 5, 0, 0, 0) == [0, 1, 5, 10, 11]
    assert slot_tokens(pool, [2, 6], 5, 1, 1, 1) == [0, 1, 2, 3, 11]
    assert slot_tokens(pool, [9], 4, 0, 0, 0) == [8, 9, 10, 11]  # block 9 was only read


def test_into_another_pool():
    pool, dst = world(), torch.zeros((3, LAYERS, 2, BS, HEADS, 1))
    reference_compact_kv(pool, torch.tensor(TABLE), KEPT[:, :, :4], torch.tensor([2]), dst_pool=dst)
    assert slot_tokens(dst, [2], 4, 1, 0, 0) == [2, 6, 7, 9]
    assert dst[:2].abs().sum() == 0


@pytest.mark.parametrize(("args", "match"), [
    ({"kept": KEPT[:1]}, r"kept has shape \(1, 2, 5\)"),
    ({"dst": [4]}, r"5 kept tokens need 2 destination block\(s\) of 4, got 1"),
    ({"dst": [4, 4]}, "holds a block twice"),
    ({"dst": [4, 11]}, r"dst_block_ids\[1\]=11 is not a block id in \[0, 11\)"),
    ({"table": [6, 2, 12]}, r"src_table\[2\]=12 is not a block id"),
    ({"kept": KEPT + 1}, r"kept\[0, 0, 4\]=12 is not a token of a 12-slot source table"),
    ({"kept": KEPT.float()}, "kept has dtype torch.float32"),
])
def test_bad_inputs_are_refused_before_anything_is_written(args, match):
    pool = world()
    before = pool.clone()
    with pytest.raises(ValueError, match=match):
        reference_compact_kv(pool, torch.tensor(args.get("table", TABLE)), args.get("kept", KEPT),
                             torch.tensor(args.get("dst", [4, 0])))
    assert torch.equal(pool.nan_to_num(-1), before.nan_to_num(-1))
