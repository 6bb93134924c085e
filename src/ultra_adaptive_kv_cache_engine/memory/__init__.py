"""memory layer (L1): the KV spec, the backing-tensor allocator, the block pool and its free queue, the planner.

Pure bookkeeping over one preallocated paged KV tensor; nothing here knows about requests or models.
"""

from __future__ import annotations

from .allocator import MemoryAllocator, TorchAllocator, check_allocation
from .block_pool import BlockPool, EvictCallback, EvictedBlock, OutOfBlocksError
from .free_queue import FreeBlockQueue
from .kv_spec import KEY_INDEX, LAYOUT_VERSION, SUPPORTED_DTYPES, VALUE_INDEX, KVSpec
from .planner import plan_num_blocks

__all__ = [
    "KEY_INDEX",
    "LAYOUT_VERSION",
    "SUPPORTED_DTYPES",
    "VALUE_INDEX",
    "BlockPool",
    "EvictCallback",
    "EvictedBlock",
    "FreeBlockQueue",
    "KVSpec",
    "MemoryAllocator",
    "OutOfBlocksError",
    "TorchAllocator",
    "check_allocation",
    "plan_num_blocks",
]
