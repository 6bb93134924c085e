"""`PagedLlamaBackend`: Llama-family models on our own paged forward (`PagedLlama`) over the cache's pool.

On CPU a step is ONE forward: every chunk, prefill pieces and decode tokens alike, packed together
(`PagedLlama.forward_packed`), so the weights are read once per step. With an unquantized pool it attends over
the working slab (`WorkingKV`: the running sequences' KV in contiguous rows, all decode tokens in one SDPA call
per layer, nothing gathered from the pool); a sequence's row is dropped when it closes or is pressed; a step the
slab's budget cannot hold runs on the reference kernels.
On CUDA (Triton kernels):
- decode chunks (one token after all the sequence's KV) run in one batched `PagedLlama.decode` through a
  `DecodeStep` per batch size (per-row block tables and positions), the batch padded to a bucket size and
  captured as a CUDA graph on its first use, then replayed. Padding rows write into pad blocks of their own
  (taken from the pool while sequences are open, given back when none is);
- prefill chunks run packed in one forward, or, when there is one, through `PagedLlama.prefill`, which picks
  causal SDPA (FlashAttention) from position 0 and the paged or gathered path over a cached prefix.
Each sequence's KV lives in pool blocks taken through `SequenceBlocks` (the cache façade only); its opened
tokens are committed (named, reusable) as soon as their KV is computed.

A quantized pool (`KVCacheConfig.kv_dtype`): the model reads a `QuantPool` (the pool and `StagingBlocks`).
Before a step every block the step writes gets a staging block; the forward writes new KV there (the block
tables hold staging entries, ``N + id``, for unsealed blocks, the decode graphs included); at the END of the
step every staging block that is full now is sealed (quantized into the sequence's pool block, one
`seal_blocks` call) and freed, and only then are blocks committed, so a named block always holds its quantized
bytes. A partial last block stays in staging across steps (the full-precision window) and is never committed;
closing with `keep` writes back the sealed generated blocks only.

A press (`SequenceState.press`, from `KVCacheConfig.kv_press` or the request): the sequence opens its prompt
but the last token (`pause_at`: the scheduler stops its chunks there), first reusing a pressed chain of that
prompt if the cache holds one entire (`PressStep.acquire`: then nothing is prefilled or pressed and all those
tokens count as cached). Otherwise, at the end of the step that computed them (after their blocks were sealed
and committed under their own names, so a request without the press reuses them), `PressStep` presses them
into new blocks, names these by the press (`commit_named`) and the sequence continues on them
(`SequenceBlocks.adopt_pressed`): its last prompt token and everything after run at slot = RoPE position
``token - offset`` (the kept keys are shifted by the same offset). Every request with the same press, its
sampled tokens included, thus sees the same KV whether it pressed or reused. A budget that keeps the whole
prompt (or a prompt of one token) presses nothing; a pool without room for the pressed copy neither (logged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..cache.manager import KVCacheManager
from ..compression.pool_formats import residual_window
from ..compression.presses import PressConfig
from ..kernels.reference_attention import compute_dtype
from ..memory import OutOfBlocksError
from ..model.decode_step import DecodeStep
from ..model.kv_views import Pool
from ..model.loaded import LoadedModel
from ..model.paged_llama import PackedInputs, PagedLlama
from ..model.working_kv import WorkingChunk, WorkingKV
from .backend import ModelBackend
from .press_step import PressStep
from .scheduler_config import SchedulerConfig
from .sequence_blocks import PooledSequence, SequenceBlocks
from .sequence_state import SequenceState
from .staging import StagingBlocks
from .step_plan import Chunk

#: Padded decode batch sizes on CUDA (one graph each); beyond the last, multiples of 32.
_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)


#: The CPU working slab's budget, as a multiple of the pool's KV (in the attention's compute dtype).
_WORKING_SHARE = 2.0


def _bucket(n: int) -> int:
    return next((b for b in _BUCKETS if b >= n), -(-n // 32) * 32)


class PagedLlamaBackend(ModelBackend):
    """Continuous batching on `PagedLlama` (see the module docstring)."""

    name = "paged_llama"
    chunked_prefill = True

    def __init__(self, model: PagedLlama, cache: KVCacheManager, config: SchedulerConfig | None = None) -> None:
        config = config if config is not None else SchedulerConfig()
        # CPU: the layer and vocabulary products over transposed weight copies (model.transposed_products)
        self.model = model if cache.kv.device.type == "cuda" else model.with_transposed_products()
        self._cache = cache
        self.staging: StagingBlocks | None = None
        if cache.spec.pool_format is not None:  # room for one step's blocks and every sequence's partial tail
            capacity = math.ceil(config.max_step_tokens / cache.block_size) + 2 * config.max_running + 2
            self.staging = StagingBlocks(cache.spec, cache.kv, model.backend, capacity,
                                         residual_window(cache.spec.pool_format, cache.config.kv_residual_tokens))
        self.model.check_pool(self.pool)
        self.blocks = SequenceBlocks(cache)
        self.table_width = math.ceil(model.max_positions / cache.block_size)
        self.on_cuda = cache.kv.device.type == "cuda"
        self.cuda_graphs = config.cuda_graphs and self.on_cuda
        self._steps: dict[int, DecodeStep] = {}
        self._steps_generation = 0  # the staging generation the steps were built on
        self._graph_pool: Any = None
        self._pad_blocks: list[int] = []
        self._rows: dict[int, tuple[Tensor, int]] = {}  # seq_id -> (host table row, entries filled or row version)
        self._open = 0  # sequences open (pad blocks are given back when none is)
        self._presses: dict[PressConfig, PressStep] = {}
        # CPU, unquantized pool: the packed forward attends over working copies of the running sequences' KV
        self.working: WorkingKV | None = None
        if not self.on_cuda and self.staging is None:
            s, kv = model.shape, cache.kv
            budget = int(_WORKING_SHARE * kv.numel() * torch.empty((), dtype=compute_dtype(kv.dtype)).element_size())
            self.working = WorkingKV(s.num_layers, s.num_kv_heads, s.head_dim, kv.dtype, kv.device, budget)

    @property
    def pool(self) -> Pool:
        """What the model reads and writes: the pool tensor, or a quantized pool with its staging blocks."""
        return self.staging.pools if self.staging is not None else self._cache.kv

    @classmethod
    def unsupported(cls, loaded: LoadedModel, cache: KVCacheManager) -> str | None:
        model_type = getattr(loaded.model.config, "model_type", None)
        if model_type != "llama":
            return f"model_type={model_type!r} is not 'llama'"
        if int(getattr(loaded.model, "tp_size", None) or 1) > 1:
            return "the model is sharded by tensor parallelism"
        if cache.spec.dtype != loaded.dtype or cache.kv.device != loaded.device:
            return f"the pool is {cache.spec.dtype} on {cache.kv.device}; the model is {loaded.dtype} on {loaded.device}"
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

    # -- presses ------------------------------------------------------------------------------------------
    def press_step(self, config: PressConfig) -> PressStep:
        """The press step of `config` (one per press, kept: it remembers the lengths it pressed)."""
        step = self._presses.get(config)
        if step is None:
            step = self._presses[config] = PressStep(config, self.model, self._cache, inv_freq=self.model.inv_freq)
        return step

    def _press_boundary(self, state: SequenceState) -> int | None:
        """Where the state's prompt is pressed: all of it but the last token, when the press keeps fewer."""
        length = len(state.prompt) - 1
        if state.press is None or length < 1 or self.press_step(state.press).kept_tokens(length) >= length:
            return None
        return length

    def pause_at(self, state: SequenceState) -> int | None:
        seq: PooledSequence | None = state.kv
        return self._press_boundary(state) if seq is None else seq.press_at

    def _press(self, state: SequenceState) -> None:
        """Presses the state's opened tokens (all have KV, committed) and continues the sequence on the pressed
        blocks; nothing changes when the press does not apply (see `PressStep.apply`)."""
        seq: PooledSequence = state.kv
        step = self.press_step(state.press)  # type: ignore[arg-type]
        prompt = state.prompt[: seq.opened]
        if self.staging is None:
            result = step.apply(seq.table, prompt)
        else:
            result = step.apply(self.staging.row(seq.seq_id, seq.table), prompt, pool=self.staging.pools)
        if result is None:
            return
        assert result.rope_offset == 0  # the kept keys are shifted: slot == RoPE position
        self._cache.commit_named(result.table, result.hashes)
        step.remember(result.length)
        old = seq.seq_id
        self.blocks.adopt_pressed(seq, result.table, result.kept)
        self._rows.pop(old, None)
        if self.working is not None:
            self.working.drop(old)
        if self.staging is not None:
            self.staging.close(old)
            self.staging.open(seq.seq_id, result.kept // self._cache.block_size)

    # -- opening and closing ------------------------------------------------------------------------------
    def open(self, state: SequenceState) -> None:
        press_at = self._press_boundary(state)
        hit = None
        if state.press is not None and len(state.prompt) > 1:
            hit = self.press_step(state.press).acquire(state.prompt, len(state.prompt) - 1)
        if hit is not None:
            seq = self.blocks.open_pressed(hit.blocks, hit.length, hit.kept)
            if not self.blocks.grow(seq, state.num_tokens):  # the admission chunk computes every other token
                self.blocks.release(seq)
                raise OutOfBlocksError(f"no room for the {state.num_tokens - hit.length} tokens after a pressed prompt")
        else:
            tokens = state.tokens()
            seq = self.blocks.open(tokens[:press_at] if press_at is not None else tokens)
            seq.press_at = press_at
        if self.staging is not None:
            self.staging.open(seq.seq_id, seq.slot(seq.cached) // self._cache.block_size)
        self._open += 1
        state.kv, state.num_computed = seq, seq.cached
        if state.cached_tokens is None:
            state.cached_tokens, state.hit_tiers = seq.cached, seq.hit_tiers

    def reserve(self, state: SequenceState, total_tokens: int) -> bool:
        return self.blocks.grow(state.kv, total_tokens)

    def close(self, state: SequenceState, keep: bool) -> None:
        seq: PooledSequence = state.kv
        state.kv = None
        try:
            if keep:
                self._write_back(seq, state)
        finally:
            self._rows.pop(seq.seq_id, None)
            if self.working is not None:
                self.working.drop(seq.seq_id)
            self.blocks.release(seq)
            self._open -= 1
            if self.staging is not None:
                self.staging.close(seq.seq_id)
                if not self._open:
                    self.staging.free_pads()
            if not self._open and self._pad_blocks:
                self._cache.free_scratch(self._pad_blocks)
                self._pad_blocks = []

    def _write_back(self, seq: PooledSequence, state: SequenceState) -> None:
        """The KV of the generated tokens that have it, appended and committed (a quantized pool: the sealed,
        full blocks only)."""
        if seq.pressed:
            return  # pressed KV is never named by its tokens
        end = max(seq.opened, state.num_computed)
        if self.staging is None:
            self.blocks.write_back(seq, state.tokens(seq.opened, end))
            return
        sealed_end = max(seq.opened, self.staging.sealed_blocks(seq.seq_id) * self._cache.block_size)
        self.blocks.write_back_sealed(seq, state.tokens(seq.opened, sealed_end))

    # -- the step -----------------------------------------------------------------------------------------
    def execute(self, chunks: Sequence[Chunk]) -> Tensor:
        if self.staging is not None:
            for chunk in chunks:
                seq = chunk.state.kv
                self.staging.stage(seq.seq_id, seq.slot(chunk.start + chunk.count))
        rows: list[Tensor | None] = [None] * len(chunks)
        decodes = [i for i, c in enumerate(chunks) if c.is_decode] if self.on_cuda else []
        if decodes and len(decodes) == len(chunks):  # decode only: the logits rows are the result as they are
            logits = self._decode(list(chunks))
            self._commit_computed(chunks)
            return logits
        if decodes:
            logits = self._decode([chunks[i] for i in decodes])
            for k, i in enumerate(decodes):
                rows[i] = logits[k]
        rest = [i for i, c in enumerate(chunks) if not (self.on_cuda and c.is_decode)]
        if len(rest) == 1 and self.on_cuda:
            rows[rest[0]] = self._prefill(chunks[rest[0]])
        elif rest:
            logits = self._packed([chunks[i] for i in rest])
            for k, i in enumerate(rest):
                rows[i] = logits[k]
        rows = [row if chunk.samples else None for row, chunk in zip(rows, chunks, strict=True)]
        self._commit_computed(chunks)
        sampled = [r for r in rows if r is not None]
        if not sampled:
            return torch.empty((0, self.model.shape.vocab_size), device=self.model.device)
        return torch.stack(sampled)

    def _commit_computed(self, chunks: Sequence[Chunk]) -> None:
        """Seals the blocks the step filled (a quantized pool), then names the opened tokens' blocks of every
        sequence whose opened tokens all have KV now, then presses the sequences that reached `press_at`."""
        if self.staging is not None:
            self.staging.seal([(c.state.kv.seq_id, c.state.kv.slot(c.start + c.count), c.state.kv.table)
                               for c in chunks])
        for chunk in chunks:
            seq: PooledSequence = chunk.state.kv
            if not seq.committed and chunk.start + chunk.count >= seq.opened:
                self.blocks.commit_opened(seq)
            if seq.press_at is not None and chunk.start + chunk.count >= seq.press_at:
                seq.press_at = None
                self._press(chunk.state)

    def _kernel_table(self, seq: PooledSequence) -> list[int]:
        """The sequence's block table as the kernels read it (staging entries for unsealed blocks)."""
        return seq.table if self.staging is None else self.staging.row(seq.seq_id, seq.table)

    def _packed(self, chunks: list[Chunk]) -> Tensor:
        inputs = PackedInputs.pack([(c.token_ids(), c.state.kv.slot(c.start), self._kernel_table(c.state.kv))
                                    for c in chunks],
                                   self.model.device, self._cache.block_size)
        working = None
        if self.working is not None and inputs.max_seq_len <= self.model.max_positions:
            working = self.working.batch(self._cache.kv, [
                WorkingChunk(c.state.kv.seq_id, c.state.kv.slot(c.start), c.state.kv.slot(c.start) + c.count,
                             c.state.kv.table) for c in chunks])
        return self.model.forward_packed(self.pool, inputs, working=working)

    def _prefill(self, chunk: Chunk) -> Tensor:
        device = self.model.device
        seq: PooledSequence = chunk.state.kv
        ids = torch.tensor(chunk.token_ids(), dtype=torch.int64).to(device, non_blocking=True)
        table = torch.tensor(self._kernel_table(seq), dtype=torch.int32).to(device, non_blocking=True)
        return self.model.prefill(self.pool, ids, seq.slot(chunk.start), table)

    def _decode(self, chunks: list[Chunk]) -> Tensor:
        n = len(chunks)
        batch = _bucket(n) if self.cuda_graphs else n
        pads = self._pad_rows(batch - n) if batch > n else []
        batch = batch if pads else n  # no pad blocks to be had: an unpadded step of its own
        if self.staging is not None and self.staging.generation != self._steps_generation:
            self._steps, self._steps_generation = {}, self.staging.generation  # the staging tensor moved
        step = self._steps.get(batch)
        if step is None:
            step = self._steps[batch] = DecodeStep(self.model, self.pool, batch, self.table_width)
        rows = [self._table_row(c.state.kv) for c in chunks]
        tables = torch.stack(rows + [torch.zeros_like(rows[0])] * (batch - n))
        tokens = [c.token_ids()[0] for c in chunks]
        positions = [c.state.kv.slot(c.start) for c in chunks]
        if batch > n:  # padding row j writes position j of the pad blocks
            tables[n:, : len(pads)] = torch.tensor(pads, dtype=torch.int32)
            tokens += [0] * (batch - n)
            positions += range(batch - n)
        step.load(tokens, positions, tables)
        if self.cuda_graphs and not step.captured and step.capture_error is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            step.capture(self._graph_pool)
        logits, _ = step.run()
        return logits[:n]

    def _table_row(self, seq: PooledSequence) -> Tensor:
        """The sequence's kernel block table as a host int32 row of `table_width`, updated only where it grew
        (a quantized pool: rebuilt when a block was staged or sealed), so a step's tables are one stack, not one
        list conversion per row."""
        row, filled = self._rows.get(seq.seq_id, (None, 0))
        if row is None:
            row = torch.zeros(self.table_width, dtype=torch.int32)
        if self.staging is not None:
            version = self.staging.version(seq.seq_id) * (self.table_width + 1) + len(seq.table) + 1
            if filled != version:
                entries = self.staging.row(seq.seq_id, seq.table)
                row[: len(entries)] = torch.tensor(entries, dtype=torch.int32)
                self._rows[seq.seq_id] = (row, version)
            return row
        if filled != len(seq.table):
            row[filled : len(seq.table)] = torch.tensor(seq.table[filled:], dtype=torch.int32)
            self._rows[seq.seq_id] = (row, len(seq.table))
        return row

    def _pad_rows(self, count: int) -> list[int]:
        """Pad blocks holding `count` padding rows (taken from the pool, or staging blocks of a quantized pool,
        while sequences are open); [] when the pool has none to spare."""
        if self.staging is not None:
            return self.staging.pad_blocks(count)
        missing = -(-count // self._cache.block_size) - len(self._pad_blocks)
        if missing > 0:
            try:
                self._pad_blocks += self._cache.allocate_scratch(missing)
            except OutOfBlocksError:
                return []
        return self._pad_blocks
