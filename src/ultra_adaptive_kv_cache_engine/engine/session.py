"""`ModelSession`: text in, text out, on one model, with every cached prompt prefix reused.

It owns the model, its `KVCacheManager` (namespace = model identity, weights, tokenizer, dtype, block size,
codec, tenant salt) and one lock: generations run one at a time on the model (requests queue on the lock),
each in a worker thread so the event loop stays free. Bad requests raise `RequestError` (a ValueError)
before anything touches the cache.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..cache.manager import KVCacheManager
from ..cache.tier_list import namespace_codec
from ..config import KVCacheConfig
from ..metrics import Counters, Profiler
from ..model.generation import generate_with_prefix_cache
from ..model.loaded import LoadedModel
from ..model.loader import load_model
from .optimizer import CachedBlock, PerformanceOptimizer
from .requests import RequestError
from .sampling import SamplingParams, parse_messages, parse_sampling
from .stream import StreamChunk

POOL = "pool"  # the tier name of blocks already in the block pool


class _StopOnText(StoppingCriteria):
    """Stops once the generated text of every row contains one of the stop strings."""

    def __init__(self, decode: Any, prompt_length: int, stops: tuple[str, ...]) -> None:
        self.decode, self.prompt_length, self.stops = decode, prompt_length, stops

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = [any(s in self.decode(row[self.prompt_length :].tolist()) for s in self.stops) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _EmitTokens(StoppingCriteria):
    """Hands each step's new token to `emit` and stops the generation once `cancelled` is set."""

    def __init__(self, prompt_length: int, emit: Callable[[int], None], cancelled: threading.Event) -> None:
        self.prompt_length, self.emit, self.cancelled = prompt_length, emit, cancelled

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if input_ids.shape[1] > self.prompt_length:
            self.emit(int(input_ids[0, -1]))
        stop = self.cancelled.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class ModelSession:
    """One model and its paged prefix cache, serving `process` requests."""

    def __init__(
        self,
        config: KVCacheConfig,
        profiler: Profiler | None = None,
        loaded: LoadedModel | None = None,
        optimizer: PerformanceOptimizer | None = None,
    ) -> None:
        self.config = config
        self.profiler = profiler or Profiler(enabled=False)
        self.loaded = loaded if loaded is not None else load_model(config)
        self.optimizer = optimizer or PerformanceOptimizer()
        self.optimizer.bandwidth.set_prior(POOL, 1e18)  # blocks already in the pool cost nothing to "load"
        spec = self.loaded.kv_spec(config.block_size, dtype=config.dtype)
        namespace = self.loaded.namespace(spec, codec=namespace_codec(config), tenant_salt=config.tenant_salt)
        self.cache = KVCacheManager.from_config(config, spec, namespace)
        if config.enable_optimizer:  # compute or load, per request, from measured costs
            self.cache.set_load_planner(self._plan_load, self._observe_load)
        self._load_s = 0.0
        self.counters = Counters()
        self._lock = threading.Lock()

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

    def _parse(self, request: dict[str, Any]) -> tuple[list[int], SamplingParams]:
        ids = self.encode_request(request)
        params = parse_sampling(request, self.config.max_new_tokens)
        self._check_context(len(ids), params.max_new_tokens)
        return ids, params

    async def process(self, request: dict[str, Any]) -> dict[str, Any]:
        ids, params = self._parse(request)
        return await asyncio.to_thread(self.generate, ids, params)

    def stream(self, request: dict[str, Any]) -> AsyncIterator[StreamChunk]:
        """The request's completion as `StreamChunk`s (see engine/stream.py). Validates now: RequestError before
        iteration. Closing the iterator stops the generation."""
        ids, params = self._parse(request)
        return self._stream(ids, params)

    async def _stream(self, ids: list[int], params: SamplingParams) -> AsyncIterator[StreamChunk]:
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(token: int) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, token)

        task = asyncio.ensure_future(asyncio.to_thread(self.generate, ids, params, emit, cancelled))
        codec, sent, emitted = self.loaded.tokenizer, "", []
        try:
            while not task.done() or not tokens.empty():
                getter = asyncio.ensure_future(tokens.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                token = getter.result()
                if token == codec.eos_token_id:
                    continue
                emitted.append(token)
                text = _cut_at_stop(codec.decode(emitted), params.stop)
                if text.endswith("\ufffd") or params.stop:
                    continue  # an incomplete character, or text a stop string may still cut: wait for the end
                if text.startswith(sent) and len(text) > len(sent):
                    yield StreamChunk(text[len(sent):], (token,), None, len(ids), 0, len(emitted))
                    sent = text
            result = task.result()
            tail = result["text"][len(sent):] if result["text"].startswith(sent) else ""
            yield StreamChunk(tail, (), result["finish_reason"], result["prompt_tokens"], result["cached_tokens"],
                              result["completion_tokens"])
        finally:
            cancelled.set()
            if not task.done():
                await asyncio.wait({task})

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
        self._load_s += seconds

    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        context = self.loaded.max_context
        if prompt_tokens + max_new_tokens > context:
            raise RequestError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                f"of {context} tokens; shorten the prompt or lower max_new_tokens"
            )

    def generate(
        self, prompt_ids: list[int], params: SamplingParams, emit: Callable[[int], None] | None = None,
        cancelled: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Generate for one prompt (blocking); the result dict of the `process` action. `emit` gets each new
        token as it is generated; setting `cancelled` stops the generation."""
        codec = self.loaded.tokenizer
        kwargs: dict[str, Any] = {"max_new_tokens": params.max_new_tokens, "do_sample": not params.greedy,
                                  "pad_token_id": codec.pad_token_id if codec.pad_token_id is not None
                                  else codec.eos_token_id}
        if not params.greedy:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=0)
        if codec.eos_token_id is not None:
            kwargs["eos_token_id"] = codec.eos_token_id
        criteria = [_StopOnText(codec.decode, len(prompt_ids), params.stop)] if params.stop else []
        if emit is not None or cancelled is not None:
            criteria.append(_EmitTokens(len(prompt_ids), emit or (lambda token: None), cancelled or threading.Event()))
        if criteria:
            kwargs["stopping_criteria"] = StoppingCriteriaList(criteria)
        start = time.perf_counter()
        with self._lock:
            queued = time.perf_counter() - start
            if params.seed is not None:
                torch.manual_seed(params.seed)
            self._load_s = 0.0
            with torch.inference_mode():
                result = generate_with_prefix_cache(self.loaded.model, self.cache, [prompt_ids], **kwargs)
            if result.prompt_tokens > result.cached_tokens:  # what the prefill of the rest cost
                self.optimizer.observe_prefill(result.cached_tokens, result.prompt_tokens,
                                               max(result.ttft_s - self._load_s, 1e-6))
        new_ids = result.generated_ids[0].tolist()
        finish = "length"
        if codec.eos_token_id is not None and codec.eos_token_id in new_ids:
            new_ids, finish = new_ids[: new_ids.index(codec.eos_token_id)], "stop"
        text = _cut_at_stop(codec.decode(new_ids), params.stop)
        if cancelled is not None and cancelled.is_set():
            finish = "cancelled"
        elif len(text) < len(codec.decode(new_ids)):
            finish = "stop"
        self.counters.add("requests")
        self.counters.add("prompt_tokens", result.prompt_tokens)
        self.counters.add("cached_tokens", result.cached_tokens)
        self.profiler.record("process.ttft", result.ttft_s)
        return {
            "action": "process",
            "text": text,
            "cache_hit": result.cache_hit,
            "cached_tokens": result.cached_tokens,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": len(new_ids),
            "finish_reason": finish,
            "ttft_ms": (queued + result.ttft_s) * 1e3,
            "latency_ms": (time.perf_counter() - start) * 1e3,
        }

    # ----------------------------------------------------------------- introspection
    def stats(self) -> dict[str, Any]:
        c = self.counters.snapshot()
        prompt = c.get("prompt_tokens", 0)
        return {**self.cache.stats(), "requests": c.get("requests", 0), "prompt_tokens": prompt,
                "cached_tokens": c.get("cached_tokens", 0),
                "token_hit_rate": c.get("cached_tokens", 0) / prompt if prompt else 0.0}

    def describe(self) -> dict[str, Any]:
        spec = self.cache.spec
        return {
            "model": {"id": self.loaded.model_id, "path": str(self.loaded.path) if self.loaded.path else None,
                      "dtype": str(self.loaded.dtype), "device": str(self.loaded.device),
                      "max_context": self.loaded.max_context,
                      "parameters": sum(p.numel() for p in self.loaded.model.parameters()),
                      "weights_fingerprint": self.loaded.weights_fingerprint},
            "kv": {"layers": spec.num_layers, "kv_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                   "block_size": spec.block_size, "dtype": str(spec.dtype), "bytes_per_token": spec.bytes_per_token,
                   "bytes_per_block": spec.bytes_per_block, "pool_blocks": self.cache.num_blocks,
                   "pool_bytes": self.cache.num_blocks * spec.bytes_per_block,
                   "namespace": self.cache.namespace.digest.hex()},
        }


def _cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]
