"""The small interfaces the adaptive controllers read, and the machine's memory pressure.

Controllers never reach into a tier: they act through the objects the cache manager hands them
(`cache.tier_controls`: `TierControl` to resize a tier, `BlockSource` to locate and promote blocks) and read
what these Protocols expose, so each one is tested against real tiers or a tiny real implementation in a test.

- `HitRateModel`: a predicted hit-rate curve and access rate (`WorkloadPredictor` is one).
- `MemoryPressure`: how many bytes the machine can still give (`AutoScaler`); `SystemMemoryPressure` is this
  machine's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable


@runtime_checkable
class HitRateModel(Protocol):
    """A predicted hit rate for an LRU cache of `capacity_bytes`, and the block accesses per second expected."""

    def hit_rate(self, capacity_bytes: int) -> float: ...

    def access_rate(self, horizon_s: float) -> float: ...


@runtime_checkable
class MemoryPressure(Protocol):
    """Bytes the machine can still give (negative: it is short by that much)."""

    def available_bytes(self) -> int: ...


class SystemMemoryPressure:
    """`MemoryPressure` of this machine: MemAvailable (Linux) less `reserve_bytes` kept for everything else.

    Where /proc/meminfo is missing, free physical pages (os.sysconf) stand in for available memory.
    """

    def __init__(self, reserve_bytes: int = 0, meminfo: str | os.PathLike[str] = "/proc/meminfo") -> None:
        if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
            raise ValueError(f"reserve_bytes={reserve_bytes!r} must be a non-negative integer")
        self.reserve_bytes = reserve_bytes
        self.meminfo = Path(meminfo)

    def available_bytes(self) -> int:
        return self._available() - self.reserve_bytes

    def _available(self) -> int:
        try:
            for line in self.meminfo.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
