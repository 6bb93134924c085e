"""`ShadowVerifier`: a share of the requests served from cached KV is recomputed in the background and compared.

Why: a cached block is trusted by its name alone once it is in the pool. A block that came from a shared tier
(another process, another machine), a bug in a kernel or a codec, or memory corruption would be served to
every later request sharing the prefix. Recomputing a sample of hits bounds how long such a block survives.

How: `on_finished(state)` (the model session's hook, called once per ended request) picks every request with
cached tokens while the running share of picked ones stays under `shadow_fraction` (a deterministic credit,
so 1% is exactly one request in a hundred, 100% all of them), and queues its cached prefix. A background thread
looks that prefix up in the pool (the blocks still named there), runs the model on those tokens without any
cache (the reference KV) and compares, block by block and layer by layer, `max|cached - reference|` against
`tolerance * max|reference|` (the relative tolerance of the pool's dtype, widened for a lossy tier codec or a
quantized pool, whose blocks are read dequantised: it tells corruption from rounding). The first block over it and every block after it in the chain are a mismatch:
logged with the block hash (a warning), counted, and evicted everywhere (`KVCacheManager.evict_blocks`: pool
and every tier, Redis included). Counts: `stats()` (in `get_stats()["model"]["shadow"]`) and, when the engine
has a metrics registry, `uakv:shadow_checks_total`, `uakv:shadow_mismatches_total`,
`uakv:shadow_mismatched_blocks_total`. The queue is bounded (`max_pending`); a request that finds it full
is not checked (`skipped_full`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cache.manager import KVCacheManager
from ..metrics import LOGGER_NAME, Counters
from ..types import CodecKind
from .sequence_state import SequenceState

logger = logging.getLogger(LOGGER_NAME)
DTYPE_TOLERANCE = {torch.float32: 2e-3, torch.float64: 1e-6, torch.float16: 5e-2, torch.bfloat16: 1e-1}
"""Relative tolerance of a recomputation in each pool dtype (kernels reduce in another order)."""
CODEC_TOLERANCE = {CodecKind.FP8: 0.15, CodecKind.INT8: 0.05, CodecKind.INT4: 0.35}
"""... widened for blocks that may have come through a lossy tier codec (lossless codecs add nothing)."""
POOL_FORMAT_TOLERANCE = {"fp8": 0.15, "int8": 0.05, "int4": 0.35, "int2": 0.6}
"""... and for a quantized pool, whose blocks are read dequantised (int2 keeps 4 levels: up to a third of a
channel's range per element)."""
_STOP = None


@dataclass(frozen=True)
class ShadowResult:
    """One check: `blocks` compared, `mismatch` the index of the first block over tolerance (None: all agreed),
    `worst` the largest relative error seen, `evicted` pool blocks unnamed because of it."""

    blocks: int
    mismatch: int | None
    worst: float
    evicted: int = 0


class ShadowVerifier:
    """Recomputes a `fraction` of cache hits of `cache` with `model` in a background thread (module docstring)."""

    def __init__(self, fraction: float, cache: KVCacheManager, model: nn.Module, tolerance: float,
                 registry: Any = None, max_pending: int = 64) -> None:
        if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction <= 1:
            raise ValueError(f"fraction={fraction!r} must be a number in [0, 1]")
        self.fraction, self.cache, self.model, self.tolerance = float(fraction), cache, model, tolerance
        self.counters = Counters()
        self._credit = 0.0
        self._queue: queue.Queue[tuple[int, ...] | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._prometheus = _prometheus(registry) if registry is not None and fraction > 0 else None

    @classmethod
    def for_session(cls, fraction: float, cache: KVCacheManager, model: nn.Module, registry: Any = None,
                    ) -> ShadowVerifier:
        """A verifier whose tolerance follows the pool's dtype and the tiers' codec (lossy ones widen it)."""
        tolerance = DTYPE_TOLERANCE.get(cache.spec.dtype, 1e-1)
        if cache.spec.pool_format is not None:
            tolerance = max(tolerance, POOL_FORMAT_TOLERANCE.get(cache.spec.pool_format, 1.0))
        if cache.lower is not None:
            tolerance = max(tolerance, CODEC_TOLERANCE.get(cache.config.codec, 0.0))
        return cls(fraction, cache, model, tolerance, registry)

    def on_finished(self, state: SequenceState) -> None:
        """Queues the request's cached prefix for a check when its turn comes (never blocks the caller)."""
        cached = state.cached_tokens or 0
        if self.fraction <= 0 or cached < self.cache.block_size:
            return
        with self._lock:
            self._credit += self.fraction
            if self._credit < 1.0 - 1e-9:
                return
            self._credit -= 1.0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="uakv-shadow", daemon=True)
                self._thread.start()
        try:
            self._queue.put_nowait(tuple(state.prompt[:cached]))
        except queue.Full:
            self.counters.add("skipped_full")

    def drain(self) -> None:
        """Waits until every queued check is done (tests, benchmarks, shutdown)."""
        self._queue.join()

    def close(self) -> None:
        """Finishes the queued checks and stops the thread (idempotent)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _run(self) -> None:
        while True:
            tokens = self._queue.get()
            try:
                if tokens is _STOP:
                    return
                self.verify(tokens)
            except Exception:  # the thread survives anything one check does
                self.counters.add("errors")
                logger.exception("shadow verification failed")
            finally:
                self._queue.task_done()

    def verify(self, tokens: Sequence[int]) -> ShadowResult | None:
        """Compares the pool's blocks for `tokens` with a recomputation; None when the pool holds none of them."""
        match = self.cache.lookup(tokens)
        if not match.block_ids:
            self.counters.add("skipped_gone")
            return None
        reference = self._reference(list(tokens[: match.num_tokens]))
        bs, worst = self.cache.block_size, 0.0
        first_bad: int | None = None
        for layer, (ref_k, ref_v) in enumerate(reference):
            try:
                keys, values = self.cache.read_prefix(match, layer)
            except ValueError:  # a block was reused while we computed: nothing left to compare
                self.counters.add("skipped_gone")
                return None
            for cached, ref in ((keys, ref_k), (values, ref_v)):
                errors = _block_errors(cached.float(), ref.to(cached.device).float(), bs)
                worst = max(worst, max(errors))
                bad = next((i for i, e in enumerate(errors) if e > self.tolerance), None)
                if bad is not None and (first_bad is None or bad < first_bad):
                    first_bad = bad
        self.counters.add("checks")
        self.counters.add("checked_blocks", len(match.block_ids))
        if self._prometheus is not None:
            self._prometheus[0].inc()
        if first_bad is None:
            return ShadowResult(len(match.block_ids), None, worst)
        return self._mismatch(match.hashes[first_bad:], len(match.block_ids), first_bad, worst)

    def _mismatch(self, hashes: Sequence[bytes], blocks: int, first_bad: int, worst: float) -> ShadowResult:
        logger.warning("shadow verification: cached block %s (block %d of a %d-block prefix) differs from its "
                       "recomputation (relative error %.3g > %.3g); evicting it and its %d descendants everywhere",
                       hashes[0].hex(), first_bad, blocks, worst, self.tolerance, len(hashes) - 1)
        evicted = self.cache.evict_blocks(hashes)
        self.counters.add("mismatches")
        self.counters.add("mismatched_blocks", len(hashes))
        if self._prometheus is not None:
            self._prometheus[1].inc()
            self._prometheus[2].inc(len(hashes))
        return ShadowResult(blocks, first_bad, worst, evicted)

    def _reference(self, tokens: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The model's KV for `tokens`, computed from scratch: per layer (kv_heads, tokens, head_dim) keys, values."""
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([tokens], device=device), use_cache=True)
        computed = out["cache"] if "cache" in out else out["past_key_values"]
        return [(layer.keys[0], layer.values[0]) for layer in computed.layers]

    def stats(self) -> dict[str, Any]:
        c = self.counters.snapshot()
        return {"fraction": self.fraction, "tolerance": self.tolerance, "checks": c.get("checks", 0),
                "checked_blocks": c.get("checked_blocks", 0), "mismatches": c.get("mismatches", 0),
                "mismatched_blocks": c.get("mismatched_blocks", 0), "skipped_gone": c.get("skipped_gone", 0),
                "skipped_full": c.get("skipped_full", 0), "errors": c.get("errors", 0),
                "pending": self._queue.unfinished_tasks}


def _block_errors(cached: torch.Tensor, reference: torch.Tensor, block_size: int) -> list[float]:
    """Per block of `block_size` tokens (dim 1 of (heads, tokens, dim)): max |cached - reference| over the
    largest |reference| of the layer (the scale the model works at); a NaN in the cached KV counts as infinite."""
    scale = reference.abs().max().clamp_min(1e-6)
    diff = (cached - reference).abs().nan_to_num(nan=float("inf")).amax(dim=(0, 2))  # per token; NaN never agrees
    return (diff.view(-1, block_size).amax(dim=1) / scale).tolist()


def _prometheus(registry: Any) -> tuple[Any, Any, Any]:
    from prometheus_client import Counter

    return (Counter("uakv:shadow_checks", "Cache hits recomputed and compared.", registry=registry),
            Counter("uakv:shadow_mismatches", "Checks whose cached KV differed from the recomputation.",
                    registry=registry),
            Counter("uakv:shadow_mismatched_blocks", "Blocks evicted after a mismatch.", registry=registry))
