"""`PinnedHold`: host tensors kept alive until the device has passed the work that reads them.

A `copy_` from page-locked memory tells PyTorch's pinned-memory allocator to keep that memory from reuse until
the copy is done; a kernel that reads page-locked memory itself (`triton_host_copy`) does not, so its caller
holds the tensors here. Torch-only (no triton): the tiers hold one per pool.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import Tensor


class PinnedHold:
    """Keeps host tensors alive until the device has passed the work queued after them: `hold(tensors)` records
    an event on the current stream and keeps the tensors with it; held entries whose event has completed are
    let go at the next `hold` (or `release_done`). Mapped reads need it: unlike a `copy_`, a kernel reading
    page-locked memory does not tell PyTorch's pinned-memory allocator to keep that memory from reuse."""

    def __init__(self) -> None:
        self._held: deque[tuple[torch.cuda.Event, list[Tensor]]] = deque()

    def hold(self, tensors: list[Tensor], device: torch.device) -> None:
        self.release_done()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._held.append((event, tensors))

    def release_done(self) -> int:
        """Lets go of the entries whose work has completed; returns how many are still held."""
        while self._held and self._held[0][0].query():
            self._held.popleft()
        return len(self._held)
