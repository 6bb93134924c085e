"""How many pool blocks a configuration gets: the memory budget, turned into blocks before anything is allocated.

The budget, in bytes (one meaning, whatever the device):
- `config.max_memory` when given;
- else on a CUDA device `config.gpu_memory_utilization` of the device's FREE memory at the time the pool is
  built (after the model's weights are loaded), as vLLM's `gpu_memory_utilization` but of what is free;
- else (CPU) a quarter of the memory the machine has available, at most `DEFAULT_CPU_BYTES`.
A budget that the device cannot hold, or that does not fit one block, fails here with the bytes needed and
available, before the pool's tensor is allocated. `max_tokens` plays no part: it is the capacity of the seed's
tensor store only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import KVCacheConfig
from ..memory import KVSpec, plan_num_blocks

DEFAULT_CPU_BYTES = 512 * 1024**2
MemoryProbe = Callable[[torch.device], int]


def available_bytes(device: torch.device) -> int:
    """Bytes a new allocation can take on `device`: CUDA free memory, else MemAvailable (Linux) or free pages."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class PoolBudget:
    """What the planner decided: `num_blocks` of `bytes_per_block` from `budget_bytes`, and why (`source`)."""

    num_blocks: int
    bytes_per_block: int
    budget_bytes: int
    available_bytes: int
    source: str  # "max_memory", "gpu_memory_utilization", "cpu_default" or "num_blocks"

    @property
    def pool_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block



def _fmt(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 1024**2:.1f} MiB)"


def plan_pool(
    config: KVCacheConfig, spec: KVSpec, num_blocks: int | None = None, probe: MemoryProbe = available_bytes
) -> PoolBudget:
    """The pool size for `spec` under `config` (or exactly `num_blocks`, still checked against the device)."""
    available = probe(spec.device)
    if num_blocks is not None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be a positive integer or None")
        budget, source = num_blocks * spec.bytes_per_block, "num_blocks"
    elif config.max_memory is not None:
        budget, source = config.max_memory, "max_memory"
    elif spec.device.type == "cuda":
        budget, source = int(available * config.gpu_memory_utilization), "gpu_memory_utilization"
    else:
        budget, source = min(DEFAULT_CPU_BYTES, available // 4), "cpu_default"
    if budget > available:
        raise ValueError(
            f"the KV pool needs {_fmt(budget)} ({source}) on {spec.device}, but only {_fmt(available)} is "
            f"available; lower max_memory (or gpu_memory_utilization)"
        )
    if budget < spec.bytes_per_block:
        raise ValueError(
            f"the KV pool budget of {_fmt(budget)} ({source}) does not fit one block of {spec.bytes_per_block} "
            f"bytes ({spec.block_size} tokens, about {spec.bytes_per_token} bytes per token); raise max_memory"
        )
    blocks = num_blocks if num_blocks is not None else plan_num_blocks(spec, budget)
    return PoolBudget(blocks, spec.bytes_per_block, budget, available, source)
