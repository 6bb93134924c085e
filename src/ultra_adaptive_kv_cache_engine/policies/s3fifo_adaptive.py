"""S3-FIFO whose small-queue share adapts like ARC's target: ghosts of both queues say which one was short."""

from __future__ import annotations

from collections.abc import Hashable

from .base import Clock
from .ghost import GhostList
from .s3fifo import SMALL_SHARE, S3FIFOPolicy

MIN_SHARE = 0.05
MAX_SHARE = 0.5


class AdaptiveS3FIFOPolicy(S3FIFOPolicy):
    """S3-FIFO (see `S3FIFOPolicy`) plus a main ghost GM (keys evicted from M, bounded to c) and a moving
    small share s (starts at 0.1, kept in [0.05, 0.5]):

    - a new key found in G (it left S unused and came back: S was too short to see its reuse) goes to M
      and grows s by ``size / c * max(1, |GM| / |G|)``;
    - a new key found in GM (M was too short) goes to M and shrinks s by ``size / c * max(1, |G| / |GM|)``.
    G is bounded to (1 - s) c as in S3-FIFO. c is `capacity`, or when None the largest total size tracked.
    O(1) amortised per event, as S3-FIFO.
    """

    name = "s3fifo_adaptive"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._main_ghost = GhostList()
        self.small_share = SMALL_SHARE

    def _returns_to_main(self, key: Hashable, size: int) -> bool:
        # ratios are taken while the key is still in its ghost (so neither total is 0), as in ARC
        small, main = self._ghost, self._main_ghost
        if key in small:
            step = size / self.target_capacity * max(1.0, main.total / small.total)
            self.small_share = min(MAX_SHARE, self.small_share + step)
            small.pop(key)
            return True
        if key in main:
            step = size / self.target_capacity * max(1.0, small.total / main.total)
            self.small_share = max(MIN_SHARE, self.small_share - step)
            main.pop(key)
            return True
        return False

    def on_remove(self, key: Hashable) -> None:
        size = self._size.get(key)
        from_main = self._pending.get(key) is False
        super().on_remove(key)
        if from_main and size is not None:
            self._main_ghost.add(key, size)
            self._main_ghost.trim(self.target_capacity)
