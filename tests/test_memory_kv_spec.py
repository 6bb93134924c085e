"""KVSpec, the planner and the allocators: shapes, sizes, validation, and a user's own allocator."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.memory import BlockPool, KVSpec, TorchAllocator, plan_num_blocks
from ultra_adaptive_kv_cache_engine.types import KVDType


class CustomMemoryAllocator:
    """The seed's example allocator, on CPU: float16 tensors, and a record of what it handed out."""

    def __init__(self) -> None:
        self.allocated: list[int] = []
        self.deallocated = 0

    def allocate(self, size: int) -> torch.Tensor:
        self.allocated.append(size)
        return torch.empty(size, dtype=torch.float16, device="cpu")

    def deallocate(self, tensor: torch.Tensor) -> None:
        self.deallocated += 1
        del tensor


def test_sizes_of_a_small_spec():
    spec = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)
    assert spec.block_shape == (3, 2, 4, 2, 8)
    assert spec.pool_shape(11) == (11, 3, 2, 4, 2, 8)
    assert spec.elements_per_block == 3 * 2 * 4 * 2 * 8 == 384
    assert spec.bytes_per_block == 768
    assert spec.bytes_per_token == 192 == spec.bytes_per_block // spec.block_size


def test_dtype_and_device_are_normalised():
    spec = KVSpec(1, 1, 1, 1, dtype=KVDType.FLOAT32, device="cpu")
    assert spec.dtype is torch.float32 and spec.device == torch.device("cpu")
    assert KVSpec(1, 1, 1, 1, dtype="bfloat16").dtype is torch.bfloat16
    assert spec == KVSpec(1, 1, 1, 1, dtype=torch.float32, device=torch.device("cpu"))


@pytest.mark.parametrize("field", ["num_layers", "num_kv_heads", "head_dim", "block_size"])
@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_sizes_name_the_field(field: str, bad: object):
    kwargs: dict[str, object] = {"num_layers": 1, "num_kv_heads": 1, "head_dim": 1, "block_size": 1, field: bad}
    with pytest.raises(ValueError, match=f"KVSpec.{field}="):
        KVSpec(**kwargs)  # type: ignore[arg-type]


def test_unsupported_dtype_and_device_are_rejected():
    with pytest.raises(ValueError, match="KVSpec.dtype=torch.int64 is not supported"):
        KVSpec(1, 1, 1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="KVSpec.device='nowhere'"):
        KVSpec(1, 1, 1, 1, device="nowhere")


def test_planner_counts_whole_blocks():
    spec = KVSpec(2, 2, 4, 4, dtype=torch.float32)  # 512 bytes per block
    assert plan_num_blocks(spec, 512) == 1
    assert plan_num_blocks(spec, 512 * 11 + 511) == 11
    assert plan_num_blocks(spec, 512 * 11, max_blocks=5) == 5
    with pytest.raises(ValueError, match="budget_bytes=511 does not fit one block of 512 bytes"):
        plan_num_blocks(spec, 511)
    with pytest.raises(ValueError, match="budget_bytes=-1"):
        plan_num_blocks(spec, -1)
    with pytest.raises(ValueError, match="max_blocks=0"):
        plan_num_blocks(spec, 1024, max_blocks=0)


def test_planned_pool_fits_the_budget():
    spec = KVSpec(2, 2, 4, 4, dtype=torch.float16)
    budget = 10_000
    pool = BlockPool(spec, plan_num_blocks(spec, budget))
    assert pool.kv.numel() * pool.kv.element_size() <= budget
    assert (pool.num_blocks + 1) * spec.bytes_per_block > budget


def test_torch_allocator_gives_the_requested_tensor():
    tensor = TorchAllocator(torch.bfloat16, "cpu").allocate(7)
    assert tensor.shape == (7,) and tensor.dtype is torch.bfloat16 and tensor.device.type == "cpu"
    with pytest.raises(ValueError, match="size=-1"):
        TorchAllocator(torch.float16, "cpu").allocate(-1)


def test_pool_takes_a_users_allocator_and_returns_the_tensor_on_close():
    allocator = CustomMemoryAllocator()
    spec = KVSpec(2, 2, 4, 4, dtype=torch.float16)
    pool = BlockPool(spec, 11, allocator=allocator)
    assert allocator.allocated == [11 * spec.elements_per_block]
    assert pool.kv.shape == (11, 2, 2, 4, 2, 4) and pool.kv.dtype is torch.float16
    pool.close()
    assert allocator.deallocated == 1
    pool.close()  # idempotent
    assert allocator.deallocated == 1


def test_pool_rejects_an_allocation_of_the_wrong_dtype():
    with pytest.raises(ValueError, match="CustomMemoryAllocator.allocate.*dtype torch.float16.*expects torch.float32"):
        BlockPool(KVSpec(1, 1, 4, 4, dtype=torch.float32), 3, allocator=CustomMemoryAllocator())


class _Short(CustomMemoryAllocator):
    def allocate(self, size: int) -> torch.Tensor:
        return torch.empty(size - 1, dtype=torch.float16)


class _Strided(CustomMemoryAllocator):
    def allocate(self, size: int) -> torch.Tensor:
        return torch.empty(2 * size, dtype=torch.float16)[::2]


class _NotATensor(CustomMemoryAllocator):
    def allocate(self, size: int) -> torch.Tensor:
        return [0.0] * size  # type: ignore[return-value]


@pytest.mark.parametrize(
    ("allocator", "message"),
    [(_Short(), "returned 15 elements; expected exactly 16"), (_Strided(), "non-contiguous"),
     (_NotATensor(), "returned list; expected a torch.Tensor"), (object(), "must have allocate")],
)
def test_pool_rejects_bad_allocators(allocator: object, message: str):
    with pytest.raises((ValueError, TypeError), match=message):
        BlockPool(KVSpec(1, 1, 2, 4, dtype=torch.float16), 1, allocator=allocator)  # type: ignore[arg-type]
