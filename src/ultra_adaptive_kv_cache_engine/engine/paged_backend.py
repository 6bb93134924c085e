"""`PagedLlamaBackend`: Llama-family models on our own paged forward (`PagedLlama`) over the cache's pool.

A step's chunks run in two kinds of forward:
- decode chunks (one token after all the sequence's KV) in ONE batched `PagedLlama.decode` through a
  `DecodeStep` per batch size (per-row block tables and positions). On CUDA the batch is padded to a bucket
  size (padding rows repeat row 0: same token, position and slot, so they write the same values to the same
  place) and the step is captured as a CUDA graph on its first use, then replayed; eagerly elsewhere.
- prefill chunks, one `PagedLlama.prefill` each (causal SDPA for a chunk from position 0, the paged prefill
  kernel over the cached prefix otherwise); the reference kernels on CPU, Triton on CUDA.
Each sequence's KV lives in pool blocks taken through `SequenceBlocks` (the cache façade only); its opened
tokens are committed (named, reusable) as soon as their KV is computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..cache.manager import KVCacheManager
from ..model.decode_step import DecodeStep
from ..model.loaded import LoadedModel
from ..model.paged_llama import PagedLlama
from .backend import ModelBackend
from .scheduler_config import SchedulerConfig
from .sequence_blocks import PooledSequence, SequenceBlocks
from .sequence_state import SequenceState
from .step_plan import Chunk

#: Padded decode batch sizes on CUDA (one graph each); beyond the last, multiples of 32.
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


def _bucket(n: int) -> int:
    return next((b for b in _BUCKETS if b >= n), -(-n // 32) * 32)


class PagedLlamaBackend(ModelBackend):
    """Continuous batching on `PagedLlama` (see the module docstring)."""

    name = "paged_llama"
    chunked_prefill = True

    def __init__(self, model: PagedLlama, cache: KVCacheManager, config: SchedulerConfig | None = None) -> None:
        model.check_pool(cache.kv)
        self.model, self._cache = model, cache
        self.blocks = SequenceBlocks(cache)
        self.table_width = math.ceil(model.max_positions / cache.block_size)
        config = config if config is not None else SchedulerConfig()
        self.cuda_graphs = config.cuda_graphs and cache.kv.device.type == "cuda"
        self._steps: dict[int, DecodeStep] = {}
        self._graph_pool: Any = None

    @classmethod
    def unsupported(cls, loaded: LoadedModel, cache: KVCacheManager) -> str | None:
        model_type = getattr(loaded.model.config, "model_type", None)
        if model_type != "llama":
            return f"model_type={model_type!r} is not 'llama'"
        if int(getattr(loaded.model, "tp_size", None) or 1) > 1:
            return "the model is sharded by tensor parallelism"
        if cache.kv.dtype != loaded.dtype or cache.kv.device != loaded.device:
            return f"the pool is {cache.kv.dtype} on {cache.kv.device}; the model is {loaded.dtype} on {loaded.device}"
        return None

    @classmethod
    def create(cls, loaded: LoadedModel, cache: KVCacheManager, config: SchedulerConfig) -> PagedLlamaBackend:
        return cls(PagedLlama.from_hf(loaded.model, max_positions=loaded.max_context), cache, config)

    @property
    def cache(self) -> KVCacheManager:
        return self._cache

    # -- KV of the sequences ------------------------------------------------------------------------------
    def blocks_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self._cache.block_size)

    def blocks_to_open(self, state: SequenceState) -> int:
        return self.blocks.blocks_to_open(state.tokens())

    def open(self, state: SequenceState) -> None:
        seq = self.blocks.open(state.tokens())
        state.kv, state.num_computed = seq, seq.cached
        if state.cached_tokens is None:
            state.cached_tokens = seq.cached

    def reserve(self, state: SequenceState, total_tokens: int) -> bool:
        return self.blocks.grow(state.kv, total_tokens)

    def close(self, state: SequenceState, keep: bool) -> None:
        seq: PooledSequence = state.kv
        state.kv = None
        try:
            if keep:
                self.blocks.write_back(seq, state.tokens(seq.opened, max(seq.opened, state.num_computed)))
        finally:
            self.blocks.release(seq)

    # -- the step -----------------------------------------------------------------------------------------
    def execute(self, chunks: Sequence[Chunk]) -> Tensor:
        rows: list[Tensor | None] = [None] * len(chunks)
        decodes = [i for i, c in enumerate(chunks) if c.is_decode]
        if decodes:
            logits = self._decode([chunks[i] for i in decodes])
            for k, i in enumerate(decodes):
                rows[i] = logits[k]
        for i, chunk in enumerate(chunks):
            if not chunk.is_decode:
                out = self._prefill(chunk)
                rows[i] = out if chunk.samples else None
        for chunk in chunks:
            seq: PooledSequence = chunk.state.kv
            if not seq.committed and chunk.start + chunk.count >= seq.opened:
                self.blocks.commit_opened(seq)
        sampled = [r for r in rows if r is not None]
        if not sampled:
            return torch.empty((0, self.model.shape.vocab_size), device=self.model.device)
        return torch.stack(sampled)

    def _prefill(self, chunk: Chunk) -> Tensor:
        device = self.model.device
        seq: PooledSequence = chunk.state.kv
        ids = torch.tensor(chunk.token_ids(), dtype=torch.int64).to(device, non_blocking=True)
        table = torch.tensor(seq.table, dtype=torch.int32).to(device, non_blocking=True)
        return self.model.prefill(self._cache.kv, ids, chunk.start, table)

    def _decode(self, chunks: list[Chunk]) -> Tensor:
        n = len(chunks)
        batch = _bucket(n) if self.cuda_graphs else n
        step = self._steps.get(batch)
        if step is None:
            step = self._steps[batch] = DecodeStep(self.model, self._cache.kv, batch, self.table_width)
        tables = torch.zeros((batch, self.table_width), dtype=torch.int32)
        for r, chunk in enumerate(chunks):
            table = chunk.state.kv.table
            tables[r, : len(table)] = torch.tensor(table, dtype=torch.int32)
        tokens = [c.token_ids()[0] for c in chunks]
        positions = [c.start for c in chunks]
        if batch > n:  # padding rows repeat row 0
            tables[n:] = tables[0]
            tokens += [tokens[0]] * (batch - n)
            positions += [positions[0]] * (batch - n)
        step.load(tokens, positions, tables)
        if self.cuda_graphs and not step.captured and step.capture_error is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            step.capture(self._graph_pool)
        logits, _ = step.run()
        return logits[:n]
