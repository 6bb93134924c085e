"""WorkingLayer: the contiguous growable per-layer buffer behind PagedHFCache."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.model.working_layer import WorkingLayer


def states(batch: int, tokens: int, start: float) -> torch.Tensor:
    """(batch, 2 heads, tokens, 3) with distinct values."""
    return torch.arange(batch * 2 * tokens * 3, dtype=torch.float32).reshape(batch, 2, tokens, 3) + start


def test_grows_in_place_and_returns_all_valid_positions():
    layer = WorkingLayer(capacity=4)
    first, second = states(1, 3, 0.0), states(1, 70, 1000.0)
    k, v = layer.update(first, -first)
    assert torch.equal(k, first) and torch.equal(v, -first) and layer.capacity == 64
    k, v = layer.update(second, -second)  # 73 > 64: doubles to 128, keeps the first 3 positions
    assert layer.capacity == 128 and layer.get_seq_length() == 73
    assert torch.equal(k, torch.cat([first, second], dim=2)) and torch.equal(v, -k)
    assert layer.get_mask_sizes(1) == (74, 0) and layer.get_max_length() == -1


def test_prefix_is_loaded_once_at_first_update():
    calls: list[int] = []

    def load(keys: torch.Tensor, values: torch.Tensor) -> None:
        calls.append(keys.shape[2])
        keys.fill_(7.0)
        values.fill_(8.0)

    layer = WorkingLayer(past_length=5, capacity=8, load_prefix=load)
    assert layer.get_seq_length() == 5 and layer.get_mask_sizes(2) == (7, 0)
    new = states(1, 2, 0.0)
    k, v = layer.update(new, new)
    layer.update(new, new)
    assert calls == [5]
    assert torch.equal(k[:, :, :5], torch.full((1, 2, 5, 3), 7.0)) and torch.equal(k[:, :, 5:], new)
    assert torch.equal(v[:, :, :5], torch.full((1, 2, 5, 3), 8.0))
    with pytest.raises(ValueError, match="load_prefix"):
        WorkingLayer(past_length=3)


def test_crop_reorder_and_row_views():
    layer = WorkingLayer()
    full = states(2, 6, 0.0)
    layer.update(full, full)
    layer.crop(-2)
    assert layer.get_seq_length() == 4 and torch.equal(layer.keys, full[:, :, :4])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(1)
    layer.reorder_cache(torch.tensor([1, 0]))
    k, _ = layer.row(0, 1, 3)
    assert torch.equal(k, full[1, :, 1:3])
    with pytest.raises(ValueError, match="outside"):
        layer.row(0, 2, 5)
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized
