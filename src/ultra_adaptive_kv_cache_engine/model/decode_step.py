"""`DecodeStep`: one decode step of a `PagedLlama` for a fixed batch size and block-table width, over static
input buffers, run eagerly or replayed from a CUDA graph; it gives the logits and the greedy next ids.

A CUDA graph replays the kernels and addresses it captured, so every step copies its inputs into the same
tensors (`load`) and reads the next token ids from the same tensor. `capture` (CUDA only) first runs the
step `warmup` times on a side stream with the buffers as loaded (Triton compiles, the allocator settles),
then captures it once into `mempool` (share one pool between the steps of several batch sizes).

Invariants:
- The warm-up runs execute for real: they write the loaded tokens' KV into their slots, and the replay that
  follows writes the same values again. So `capture` must be called with a real step's inputs loaded, never
  with placeholders (which would write into whatever block the zero table names).
- A captured step launches exactly the captured work; the model's launch plans depend only on the batch
  size and table width, which are fixed here, so they cannot go stale.
- On CPU, or when capture raises, the step runs eagerly (same results); `capture_error` says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .paged_llama import DecodeInputs, PagedLlama


class DecodeStep:
    """Static inputs (token ids, positions, block tables), and the logits and greedy next ids of one decode step."""

    def __init__(self, model: PagedLlama, pool: Tensor, batch: int, table_width: int) -> None:
        for name, value in (("batch", batch), ("table_width", table_width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        model.check_pool(pool)
        self.model, self.pool = model, pool
        self.batch, self.table_width = batch, table_width
        device = pool.device
        self.inputs = DecodeInputs(
            token_ids=torch.zeros(batch, dtype=torch.int64, device=device),
            positions=torch.zeros(batch, dtype=torch.int64, device=device),
            block_tables=torch.zeros((batch, table_width), dtype=torch.int32, device=device),
        )
        self._graph: Any = None
        self._outputs: tuple[Tensor, Tensor] | None = None
        self.capture_error: str | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def load(self, token_ids: Sequence[int], positions: Sequence[int], block_tables: Tensor | None = None) -> None:
        """Copy one step's inputs into the static buffers (block tables only when given: they change per call,
        not per step). The copies are queued on the current stream without waiting for the work before them
        (a pageable source is staged at once), so loading never stalls the host on the device."""
        if len(token_ids) != self.batch or len(positions) != self.batch:
            raise ValueError(f"{len(token_ids)} token ids and {len(positions)} positions for a step of batch {self.batch}")
        self.inputs.token_ids.copy_(torch.tensor(token_ids, dtype=torch.int64), non_blocking=True)
        self.inputs.positions.copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
        if block_tables is not None:
            if tuple(block_tables.shape) != (self.batch, self.table_width):
                raise ValueError(f"block tables {tuple(block_tables.shape)}; expected {(self.batch, self.table_width)}")
            self.inputs.block_tables.copy_(block_tables, non_blocking=True)

    def _eager(self) -> tuple[Tensor, Tensor]:
        logits = self.model.decode(self.pool, self.inputs)
        return logits, logits.argmax(dim=-1)

    def capture(self, mempool: Any = None, warmup: int = 2) -> bool:
        """Capture the step as loaded into a CUDA graph; False (and `capture_error`) when it cannot be."""
        if self.pool.device.type != "cuda":
            self.capture_error = "not on CUDA"
            return False
        try:
            side = torch.cuda.Stream(self.pool.device)
            side.wait_stream(torch.cuda.current_stream(self.pool.device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self._eager()
            torch.cuda.current_stream(self.pool.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of other threads (a tier's pinned copies) do not break this capture
            with torch.cuda.graph(graph, pool=mempool, capture_error_mode="thread_local"):
                outputs = self._eager()
        except Exception as exc:  # any capture failure falls back to eager steps, reported
            self.capture_error = f"{type(exc).__name__}: {exc}"[:500]
            try:
                torch.cuda.synchronize(self.pool.device)
            except Exception:  # the context reports the same failure again; eager steps will raise if broken
                pass
            return False
        self._graph, self._outputs = graph, outputs
        return True

    def run(self) -> tuple[Tensor, Tensor]:
        """Run the loaded step; returns the logits (batch, vocab), float32, and the greedy next ids (batch,) on
        the device (static tensors when captured: read them before the next call)."""
        if self._graph is None:
            return self._eager()
        self._graph.replay()
        assert self._outputs is not None
        return self._outputs

    def __call__(self) -> Tensor:
        """Run the loaded step; returns the greedy next token ids (see `run`)."""
        return self.run()[1]
