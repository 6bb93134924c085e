"""`ModelRunner`: greedy generation for a batch of prompts with our own paged Llama over a `KVCacheManager`.

The GPU benches' fixed-batch baseline (`bench_serving.py --gpu`, the e2e benches): a batch prefilled, then
decoded in lock step. What users run is the scheduler's `PagedLlamaBackend` (continuous batching over the same
`SequenceBlocks`, `DecodeStep` and kernels), which the in-process engine measured faster than this runner.

Per call (`generate`):
1. Each prompt opens a sequence in the cache through `SequenceBlocks` (the scheduler's backend uses the same
   piece): the longest cached prefix is reused (capped at ``len(prompt) - 1`` so the last prompt token is
   always computed), from the pool or promoted from the cache's lower tiers; the remaining prompt tokens get
   placeholder KV that the prefill overwrites in place. The blocks that decoding will fill are taken from the
   pool as scratch, all at once.
2. Prefill, prompt by prompt (optionally in chunks of `prefill_chunk` tokens), gives the first token; then
   the prompt's full blocks are committed (named, indexed, written through to lower tiers), so the next
   prompts of the same call already reuse them.
3. Decode steps the whole batch one token at a time with the paged decode kernel: on CUDA a CUDA graph per
   batch size (captured at its first step, replayed afterwards), eagerly otherwise or if capture fails.
   Finished rows (eos) keep stepping inside their reserved slots until every row is done; their tokens
   after eos are dropped.
4. The generated tokens' KV is appended to each sequence and committed (multi-turn reuse); scratch blocks
   and sequences are released even when an error interrupts the call.

Invariants: a row's block table is the cache's blocks for its prompt followed by its scratch blocks, and
covers every position that gets KV (``len(prompt) + max_new_tokens - 1`` tokens); the pool is only written
in blocks this call holds. Greedy tokens equal transformers' `generate` with its DynamicCache on CPU, in
float32 (tests), for single prompts, batches of different lengths and cached prefixes.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.engine.sequence_blocks import PooledSequence, SequenceBlocks
from ultra_adaptive_kv_cache_engine.memory import OutOfBlocksError
from ultra_adaptive_kv_cache_engine.metrics import LOGGER_NAME
from ultra_adaptive_kv_cache_engine.model.decode_step import DecodeStep
from ultra_adaptive_kv_cache_engine.model.gathered_prefill import PrefillPath
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

logger = logging.getLogger(LOGGER_NAME)


class DecodeMode(str, enum.Enum):
    """How the decode steps of a call ran."""

    GRAPH = "graph"  # replayed CUDA graphs
    EAGER = "eager"  # plain kernel launches
    NONE = "none"  # no decode step (one new token, or every row finished at its first token)


@dataclass(frozen=True)
class RunnerConfig:
    """`max_context`: tokens per sequence (prompt + generated), which sizes the block tables and graphs;
    `cuda_graphs`: capture decode steps on CUDA; `prefill_chunk`: most prompt tokens per forward (None: all);
    `prefill_path`: how prefills over a cached prefix attend (None: the model's `GatherRule` chooses)."""

    max_context: int = 4096
    cuda_graphs: bool = True
    prefill_chunk: int | None = None
    prefill_path: PrefillPath | None = None

    def __post_init__(self) -> None:
        if isinstance(self.max_context, bool) or not isinstance(self.max_context, int) or self.max_context < 2:
            raise ValueError(f"max_context={self.max_context!r} must be an int >= 2")
        chunk = self.prefill_chunk
        if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
            raise ValueError(f"prefill_chunk={chunk!r} must be a positive int or None")
        if self.prefill_path is not None and not isinstance(self.prefill_path, PrefillPath):
            raise ValueError(f"prefill_path={self.prefill_path!r} must be a PrefillPath or None")


@dataclass(frozen=True)
class RunResult:
    """What one `generate` call did. `tokens[i]` are prompt i's new tokens (ending at eos if it came);
    `cached_tokens[i]` its prompt tokens whose KV was reused; `ttft_s[i]` runs from the call's start to its
    first token. Decode figures count the tokens after each row's first."""

    tokens: tuple[tuple[int, ...], ...]
    cached_tokens: tuple[int, ...]
    ttft_s: tuple[float, ...]
    prefill_s: float
    decode_s: float
    decode_steps: int
    decode_tokens: int
    decode_mode: DecodeMode
    graph_error: str | None
    committed_blocks: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class _Row:
    prompt: list[int]
    seq: PooledSequence  # its table: the cache's blocks of the sequence, then scratch blocks
    generated: list[int] = field(default_factory=list)
    finished: bool = False

    @property
    def cached(self) -> int:
        return self.seq.cached

    @property
    def table(self) -> list[int]:
        return self.seq.table


def _token_ids(prompt: object) -> list[int] | None:
    """`prompt` as a list of ints, or None if it is not a sequence (or 1-D tensor) of integers."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist() if prompt.dim() == 1 and not prompt.is_floating_point() else None
    if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence):
        return None
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None
    return list(prompt)


class ModelRunner:
    """Prefill + greedy decode of `model` over `cache` (see the module docstring). Not thread-safe: one
    runner per thread; the cache itself may be shared."""

    def __init__(self, model: PagedLlama, cache: KVCacheManager, config: RunnerConfig | None = None) -> None:
        if not isinstance(model, PagedLlama):
            raise TypeError(f"model must be a PagedLlama, got {type(model).__name__}")
        if not isinstance(cache, KVCacheManager):
            raise TypeError(f"cache must be a KVCacheManager, got {type(cache).__name__}")
        model.check_pool(cache.kv)
        self.model, self.cache = model, cache
        self.blocks = SequenceBlocks(cache)
        self.config = config if config is not None else RunnerConfig()
        self.block_size = cache.block_size
        self.table_width = math.ceil(self.config.max_context / self.block_size)
        self._steps: dict[int, DecodeStep] = {}
        self._graph_pool: Any = None

    # -- the call -----------------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, eos_token_id: int | None = None
    ) -> RunResult:
        """Greedy continuation of every prompt (token ids) by up to `max_new_tokens` tokens."""
        batch = self._check(prompts, max_new_tokens)
        start = time.perf_counter()
        rows: list[_Row] = []
        ttft: list[float] = []
        committed = 0
        try:
            for prompt in batch:
                rows.append(self._open(prompt, max_new_tokens))
                row = rows[-1]
                row.generated.append(self._prefill(row))
                row.finished = row.generated[-1] == eos_token_id or max_new_tokens == 1
                ttft.append(time.perf_counter() - start)
                committed += self.blocks.commit_opened(row.seq)
            prefill_s = time.perf_counter() - start
            steps, mode, error = self._decode(rows, max_new_tokens, eos_token_id)
            decode_s = time.perf_counter() - start - prefill_s
            for row in rows:
                committed += self._write_back(row)
        finally:
            for row in rows:
                self._release(row)
        return RunResult(
            tokens=tuple(tuple(r.generated) for r in rows), cached_tokens=tuple(r.cached for r in rows),
            ttft_s=tuple(ttft), prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps,
            decode_tokens=sum(len(r.generated) - 1 for r in rows), decode_mode=mode, graph_error=error,
            committed_blocks=committed,
        )

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive int")
        if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
            raise ValueError("prompts must be a non-empty sequence of token id sequences")
        limit = min(self.config.max_context, self.model.max_positions)
        vocab = self.model.shape.vocab_size
        out: list[list[int]] = []
        for i, prompt in enumerate(prompts):
            ids = _token_ids(prompt)
            if not ids:
                raise ValueError(f"prompts[{i}] must be a non-empty sequence of int token ids, got {prompt!r:.80}")
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"prompts[{i}] holds token id {bad[0]}; expected ids in [0, {vocab})")
            if len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                    f"context of {limit} tokens (RunnerConfig.max_context / the model's positions)"
                )
            out.append(ids)
        return out

    # -- one row ------------------------------------------------------------------------------------------
    def _open(self, prompt: list[int], max_new_tokens: int) -> _Row:
        """Open the sequence and take the scratch blocks decoding will fill (OutOfBlocksError, nothing held)."""
        seq = self.blocks.open(prompt)
        if not self.blocks.grow(seq, len(prompt) + max_new_tokens - 1):
            self.blocks.release(seq)
            raise OutOfBlocksError(
                f"{len(prompt)} prompt tokens + max_new_tokens={max_new_tokens} need more blocks of "
                f"{self.block_size} tokens than the pool has free ({self.cache.num_free_blocks} of "
                f"{self.cache.num_blocks}); free sequences, enlarge the pool or lower max_new_tokens"
            )
        return _Row(prompt, seq)

    def _prefill(self, row: _Row) -> int:
        """Runs the uncached prompt tokens; returns the first new token."""
        device = self.model.device
        cached = row.cached
        # non_blocking: no stream sync here, so the host queues the prefill while promoted blocks still copy
        ids = torch.tensor(row.prompt[cached:], dtype=torch.int64).to(device, non_blocking=True)
        table = torch.tensor(row.table, dtype=torch.int32).to(device, non_blocking=True)
        chunk = self.config.prefill_chunk or len(ids)
        logits = None
        for a in range(0, len(ids), chunk):
            logits = self.model.prefill(self.cache.kv, ids[a : a + chunk], cached + a, table, self.config.prefill_path)
        assert logits is not None  # at least one uncached token: the cap of new_sequence
        return int(logits.argmax())

    def _write_back(self, row: _Row) -> int:
        """Appends the generated tokens' KV (all but the last token, which has none) and commits."""
        return self.blocks.write_back(row.seq, row.generated[: len(row.generated) - 1])

    def _release(self, row: _Row) -> None:
        self.blocks.release(row.seq)

    # -- decode -------------------------------------------------------------------------------------------
    def _step_for(self, batch: int) -> DecodeStep:
        step = self._steps.get(batch)
        if step is None:
            step = DecodeStep(self.model, self.cache.kv, batch, self.table_width)
            self._steps[batch] = step
        return step

    def _tables(self, rows: list[_Row]) -> torch.Tensor:
        tables = torch.zeros((len(rows), self.table_width), dtype=torch.int32)
        for r, row in enumerate(rows):
            tables[r, : len(row.table)] = torch.tensor(row.table, dtype=torch.int32)
        return tables

    def _decode(self, rows: list[_Row], max_new_tokens: int, eos: int | None) -> tuple[int, DecodeMode, str | None]:
        """Steps every row until all are finished; returns (steps, mode, capture error)."""
        if all(r.finished for r in rows):
            return 0, DecodeMode.NONE, None
        step = self._step_for(len(rows))
        steps = 0
        for k in range(1, max_new_tokens):
            positions = [len(r.prompt) + k - 1 for r in rows]
            step.load([r.generated[-1] for r in rows], positions, self._tables(rows) if k == 1 else None)
            if k == 1 and self._wants_graph(step):
                step.capture(self._pool_handle())
            next_ids = step().tolist()
            steps += 1
            for row, token in zip(rows, next_ids, strict=True):
                if not row.finished:
                    row.generated.append(int(token))
                    row.finished = token == eos or len(row.generated) == max_new_tokens
            if all(r.finished for r in rows):
                break
        return steps, DecodeMode.GRAPH if step.captured else DecodeMode.EAGER, step.capture_error

    def _wants_graph(self, step: DecodeStep) -> bool:
        on_cuda = self.cache.kv.device.type == "cuda"
        return self.config.cuda_graphs and on_cuda and not step.captured and step.capture_error is None

    def _pool_handle(self) -> Any:
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool
