"""`ModelSession`: text in, text out, on one model, many requests at once, every cached prompt prefix reused.

It owns the model, its `KVCacheManager` (namespace = model identity, weights, tokenizer, dtype, block size,
codec, tenant salt), a model backend (`backend_registry`: our paged Llama forward for Llama-family models,
transformers' generate otherwise), the `Scheduler` (continuous batching) and the `StepLoop` thread that runs
its steps. Every `process` and `stream` request goes through the scheduler, so concurrent requests share
steps instead of queueing. Bad requests raise `RequestError` (a ValueError) before anything touches the cache;
a full waiting queue raises `QueueFullError`.

A press (`KVCacheConfig.kv_press`, or a request's own `kv_press`, "none" for none) evicts prompt tokens at the
end of each prefill (`PagedLlamaBackend`); only a backend with `pause_at` presses (`supports_press`), others
refuse a press by name when the session starts or the request arrives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any

from ..cache.manager import KVCacheManager
from ..cache.tier_list import namespace_codec
from ..compression.presses import PressConfig, parse_press
from ..config import KVCacheConfig
from ..metrics import Counters, Profiler
from ..model.loaded import LoadedModel
from ..model.loader import load_model
from .backend import ModelBackend
from .backend_registry import make_backend
from .controllers import Controllers, conversation_key
from .incremental_text import IncrementalText
from .optimizer import CachedBlock, PerformanceOptimizer
from .request_stream import ChunkStream
from .requests import RequestError
from .sampler import request_generator
from .sampling import parse_messages, parse_sampling
from .scheduler import Scheduler
from .scheduler_config import SchedulerConfig
from .sequence_state import SequenceState
from .setup_thread import run_on_setup_thread
from .shadow import ShadowVerifier
from .step_loop import StepLoop

POOL = "pool"  # the tier name of blocks already in the block pool


class ModelSession:
    """One model and its paged prefix cache, serving `process` and `stream` requests concurrently."""

    def __init__(
        self,
        config: KVCacheConfig,
        profiler: Profiler | None = None,
        loaded: LoadedModel | None = None,
        optimizer: PerformanceOptimizer | None = None,
        scheduler_config: SchedulerConfig | None = None,
    ) -> None:
        self.config = config
        self.press = parse_press(config.kv_press)  # a bad line fails before the model loads
        self.profiler = profiler or Profiler(enabled=False)
        self.optimizer = optimizer or PerformanceOptimizer()
        self.optimizer.bandwidth.set_prior(POOL, 1e18)  # blocks already in the pool cost nothing to "load"
        self.counters = Counters()
        self.scheduler_config = scheduler_config if scheduler_config is not None else SchedulerConfig.from_config(config)
        # The model, the pool and the backend: on a CPU built on a thread of their own (engine/setup_thread.py)
        build = partial(self._build, config, loaded)
        self.loaded, self.cache, self.backend = (
            run_on_setup_thread(build) if config.device.resolve().type == "cpu" else build())
        if config.enable_optimizer:  # compute or load, per request, from measured costs
            self.cache.set_load_planner(self._plan_load, self._observe_load)
        if self.press is not None and not self.supports_press:
            raise ValueError(f"kv_press={config.kv_press!r} needs the paged_llama backend; {self.backend.name!r} "
                             f"serves {self.loaded.model_id!r} and cannot press (set kv_press none)")
        self.scheduler = Scheduler(self.backend, self.scheduler_config)
        self.steps = StepLoop(self.scheduler, on_finished=self._finished)
        self.controllers = Controllers(config, self.cache.tier_controls(), self.cache.block_source(),
                                       self.cache.block_record_bytes())
        if self.controllers.enabled:
            self.controllers.start()
        self.shadow = ShadowVerifier.for_session(config.shadow_fraction, self.cache, self.loaded.model,
                                                 getattr(self.controllers.metrics, "registry", None))

    def _build(self, config: KVCacheConfig, loaded: LoadedModel | None
               ) -> tuple[LoadedModel, KVCacheManager, ModelBackend]:
        """The loaded model (`loaded`, else loaded from `config`), its cache manager and its model backend."""
        loaded = loaded if loaded is not None else load_model(config)
        spec = replace(loaded.kv_spec(config.block_size, dtype=config.dtype), pool_format=config.kv_dtype)
        namespace = loaded.namespace(spec, codec=namespace_codec(config), tenant_salt=config.tenant_salt)
        cache = KVCacheManager.from_config(config, spec, namespace)
        return loaded, cache, make_backend(self.scheduler_config.backend, loaded, cache, self.scheduler_config)

    # ----------------------------------------------------------------- requests
    def encode_request(self, request: dict[str, Any]) -> list[int]:
        """Prompt token ids: `messages` through the chat template; `text` as one user turn (or as is with
        `raw: True`). RequestError when the prompt is malformed or does not fit the model's context."""
        messages = parse_messages(request)
        codec = self.loaded.tokenizer
        if messages is not None:
            ids = codec.chat(messages)
        elif request.get("raw", False) is True:
            ids = codec.encode(request["text"])
        else:
            ids = codec.chat([{"role": "user", "content": request["text"]}])
        if not ids:
            raise RequestError("the prompt encodes to no tokens; expected at least one")
        return ids

    def stream(self, request: dict[str, Any]) -> ChunkStream:
        """Queues the request and returns its `StreamChunk`s (engine/stream.py). Validates first: RequestError
        for a bad request, QueueFullError when the waiting queue is full, both before anything is queued.
        Closing the stream cancels the request."""
        ids = self.encode_request(request)
        params = parse_sampling(request, self.config.max_new_tokens)
        self._check_context(len(ids), params.max_new_tokens)
        codec = self.loaded.tokenizer
        state = SequenceState(
            prompt=ids, params=params, text=IncrementalText(codec.decode, params.stop),
            eos_token_id=codec.eos_token_id, priority=_priority(request),
            generator=request_generator(params, self.cache.kv.device), conversation=conversation_key(request),
            press=self._request_press(request),
        )
        stream = ChunkStream(state, self.steps.cancel, self.steps.waker)
        self.steps.submit(state, stream.sink())
        return stream

    async def process(self, request: dict[str, Any]) -> dict[str, Any]:
        """Runs the request to its end; the result dict of the `process` action."""
        stream = self.stream(request)
        pieces: list[str] = []
        try:
            async for chunk in stream:
                pieces.append(chunk.text)
        finally:
            stream.cancel()  # no-op once it ended; cancels when the caller was cancelled
        state = stream.state
        assert state.first_token_s is not None and state.finished_s is not None
        return {
            "action": "process",
            "text": "".join(pieces),
            "cache_hit": bool(state.cached_tokens),
            "cached_tokens": state.cached_tokens or 0,
            "prompt_tokens": len(state.prompt),
            "completion_tokens": len(state.completion_ids),
            "finish_reason": state.finish_reason,
            "ttft_ms": (state.first_token_s - state.arrival_s) * 1e3,
            "latency_ms": (state.finished_s - state.arrival_s) * 1e3,
        }

    def _finished(self, state: SequenceState) -> None:
        """Records one ended request's figures (the step thread calls it once per request, whatever its end)."""
        cached = state.cached_tokens or 0
        self.counters.add("requests")
        self.counters.add("prompt_tokens", len(state.prompt))
        self.counters.add("cached_tokens", cached)
        self.counters.add("completion_tokens", len(state.completion_ids))
        self.counters.add("preemptions", state.preemptions)
        if state.first_token_s is not None:
            self.profiler.record("process.ttft", state.first_token_s - state.arrival_s)
        if len(state.prompt) > cached and state.prefill_s > 0 and state.preemptions == 0:
            self.optimizer.observe_prefill(cached, len(state.prompt), state.prefill_s)
        self._tell_controllers(state, cached)
        self.shadow.on_finished(state)

    def _tell_controllers(self, state: SequenceState, cached: int) -> None:
        """The predictor, prefetcher and metrics hear of every request: its blocks and where each was found."""
        if not self.controllers.enabled:
            return
        hashes = self.cache.hash_prompt(state.prompt)
        found = state.hit_tiers or (POOL,) * (cached // self.cache.block_size)  # backends that do not locate
        tiers: list[str | None] = [*found[: len(hashes)], *[None] * (len(hashes) - len(found))]
        ttft = state.first_token_s - state.arrival_s if state.first_token_s is not None else None
        self.controllers.on_request(state.conversation, hashes, tiers, ttft, len(state.prompt), cached)

    def _plan_load(self, pool_blocks: int, tiers: Sequence[str], prompt_tokens: int) -> int:
        """How many of the next cached blocks (found in `tiers`) to load rather than recompute."""
        nbytes = self.cache.spec.bytes_per_block
        blocks = [CachedBlock(POOL, 0)] * pool_blocks + [CachedBlock(t, nbytes) for t in tiers]
        try:
            plan = self.optimizer.plan(prompt_tokens, self.cache.block_size, blocks)
        except ValueError:  # a cost not measured yet: load, and so measure it
            self.counters.add("load_plans_unmeasured")
            return len(tiers)
        self.counters.add("load_plans")
        return plan.load_blocks - pool_blocks

    def _observe_load(self, moved: Mapping[str, int], seconds: float) -> None:
        total = sum(moved.values())
        for tier, nbytes in moved.items():
            self.optimizer.observe_transfer(tier, nbytes, max(seconds * nbytes / total, 1e-9))

    @property
    def supports_press(self) -> bool:
        """Whether the backend presses (`PagedLlamaBackend`)."""
        return getattr(self.backend, "press_step", None) is not None

    def _request_press(self, request: dict[str, Any]) -> PressConfig | None:
        """The request's `kv_press` ("none": no press), else the session's; RequestError for a bad line or a
        backend that cannot press."""
        if "kv_press" not in request:
            return self.press
        try:
            press = parse_press(request["kv_press"])
        except ValueError as exc:
            raise RequestError(str(exc)) from None
        if press is not None and not self.supports_press:
            raise RequestError(f"kv_press={request['kv_press']!r} needs the paged_llama backend; this model is "
                               f"served by {self.backend.name!r}")
        return press

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self.loaded.max_context
        if prompt_tokens + max_new_tokens > context:
            raise RequestError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"of {context} tokens; shorten the prompt or lower max_new_tokens"
            )

    def close(self) -> None:
        """Stops the step thread (queued requests are not served) and the controllers' thread, then waits for
        queued tier writes and stops the writer threads."""
        self.steps.close()
        self.controllers.stop()
        self.shadow.close()
        self.cache.close()

    # ----------------------------------------------------------------- introspection
    def stats(self) -> dict[str, Any]:
        c = self.counters.snapshot()
        prompt = c.get("prompt_tokens", 0)
        return {**self.cache.stats(), "requests": c.get("requests", 0), "prompt_tokens": prompt,
                "cached_tokens": c.get("cached_tokens", 0),
                "token_hit_rate": c.get("cached_tokens", 0) / prompt if prompt else 0.0,
                "backend": self.backend.name, "preemptions": c.get("preemptions", 0),
                "controllers": self.controllers.stats(), "shadow": self.shadow.stats()}

    def describe(self) -> dict[str, Any]:
        spec = self.cache.spec
        return {
            "model": {"id": self.loaded.model_id, "path": str(self.loaded.path) if self.loaded.path else None,
                      "dtype": str(self.loaded.dtype), "device": str(self.loaded.device),
                      "max_context": self.loaded.max_context,
                      "parameters": sum(p.numel() for p in self.loaded.model.parameters()),
                      "weights_fingerprint": self.loaded.weights_fingerprint},
            "kv": {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                   "block_size": spec.block_size, "dtype": str(spec.dtype), "pool_format": spec.pool_format,
                   "bytes_per_token": spec.bytes_per_token,
                   "bytes_per_block": spec.bytes_per_block, "pool_blocks": self.cache.num_blocks,
                   "pool_bytes": self.cache.num_blocks * spec.bytes_per_block,
                   "namespace": self.cache.namespace.digest.hex()},
            "backend": self.backend.name,
        }


def _priority(request: dict[str, Any]) -> int:
    """The request's `priority` (lower is served first; 0 when absent); RequestError unless an int."""
    value = request.get("priority", 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"priority={value!r} must be an integer (lower is served first)")
    return value
