"""memory layer (L1): the KV spec, the backing-tensor allocator, the block pool, its free queue and the evictor
of its cached blocks (driven by a `policies` eviction policy), the planner.

Pure bookkeeping over one preallocated paged KV tensor; nothing here knows about requests or models.
"""

from __future__ import annotations

from .allocator import MemoryAllocator, TorchAllocator, check_allocation
from .block_pool import BlockPool, EvictCallback, EvictedBlock, OutOfBlocksError
from .cached_blocks import CachedBlockEvictor
from .free_queue import FreeBlockQueue
from .kv_spec import KEY_INDEX, LAYOUT_VERSION, SUPPORTED_DTYPES, VALUE_INDEX, KVSpec
from .planner import plan_num_blocks

__all__ = [
    "KEY_INDEX",
    "LAYOUT_VERSION",
    "SUPPORTED_DTYPES",
    "VALUE_INDEX",
    "BlockPool",
    "CachedBlockEvictor",
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
