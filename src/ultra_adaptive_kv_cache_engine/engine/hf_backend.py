"""`HFGenerateBackend`: any transformers causal LM, through its own `generate` with the prefix cache.

Each sequence runs one `model.generate` call on its own thread (`GenerateThread`) over a `PagedHFCache`, so
the cached prefix is reused and the new full blocks are committed when it ends, exactly as
`generate_with_prefix_cache` does. The thread is driven step by step: at every step its logits processor
hands the scores to the step thread and waits for the token the scheduler's sampler picked, which it then
forces (every other token gets -inf). So sampling, stop strings, eos, cancellation and the scheduler's
order are the same as on the paged backend; sequences interleave step by step but are not batched into one
forward, and a prompt is computed in one chunk. Its KV lives in the thread's working buffers, not in pool
blocks, so this backend never needs preemption for room.
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..cache.manager import KVCacheManager
from ..model.hf_cache import PagedHFCache, quantized_pool_refusal
from ..model.loaded import LoadedModel
from .backend import ModelBackend
from .scheduler_config import SchedulerConfig
from .sequence_state import SequenceState
from .step_plan import Chunk


class _Forced(LogitsProcessor):
    def __init__(self, thread: GenerateThread) -> None:
        self.thread = thread

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        token = self.thread.hand_over(scores[0])
        forced = torch.full_like(scores, float("-inf"))
        forced[:, token if token is not None else int(scores[0].argmax())] = 0.0
        return forced


class _Stop(StoppingCriteria):
    def __init__(self, thread: GenerateThread) -> None:
        self.thread = thread

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.thread.stopping, dtype=torch.bool, device=input_ids.device)


class GenerateThread:
    """One sequence's `generate`, paused at each step's scores (see the module docstring).

    Protocol: `start()` opens the cache (returns the reused prefix length); `scores(token)` lets generate
    force `token` (None for the first step) and returns the next scores; `stop(token)` forces the last token
    and ends generate, which commits the KV, then joins."""

    def __init__(self, loaded: LoadedModel, cache: KVCacheManager, tokens: list[int], max_new_tokens: int) -> None:
        self.loaded, self.cache, self.tokens, self.max_new_tokens = loaded, cache, tokens, max_new_tokens
        self._commands: queue.Queue[tuple[str, int | None]] = queue.Queue()
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="uakv-hf-generate", daemon=True)
        self.stopping = False
        self.waiting_for_token = False

    def start(self) -> int:
        self._thread.start()
        return int(self._expect("opened"))

    def scores(self, token: int | None) -> Tensor:
        self._commands.put(("token", token))
        return self._expect("scores")

    def stop(self, token: int | None) -> None:
        self._commands.put(("stop", token))
        self._thread.join()

    def hand_over(self, scores: Tensor) -> int | None:
        """On the generate thread: posts the scores, waits for the token to force."""
        self._events.put(("scores", scores.float().clone()))
        command, token = self._commands.get()
        self.stopping = command == "stop"
        return token

    def _expect(self, kind: str) -> Any:
        event, value = self._events.get()
        if event == kind:
            return value
        if event == "error":
            raise value
        raise RuntimeError(f"generate ended early (expected {kind}, got {event})")

    def _run(self) -> None:
        try:
            model, codec = self.loaded.model, self.loaded.tokenizer
            with PagedHFCache(self.cache, [self.tokens], max_new_tokens=self.max_new_tokens) as hf_cache:
                self._events.put(("opened", sum(hf_cache.row_cached_tokens)))
                command, _ = self._commands.get()
                if command == "stop":
                    return
                config = copy.deepcopy(model.generation_config)
                config.eos_token_id = None  # the scheduler decides when a sequence ends
                config.max_length = None
                pad = codec.pad_token_id if codec.pad_token_id is not None else codec.eos_token_id
                device = next(model.parameters()).device
                ids = torch.tensor([self.tokens], device=device)
                with torch.inference_mode():
                    output = model.generate(
                        ids, attention_mask=torch.ones_like(ids), cache=hf_cache, generation_config=config,
                        logits_processor=LogitsProcessorList([_Forced(self)]),
                        stopping_criteria=StoppingCriteriaList([_Stop(self)]),
                        max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad,
                    )
                hf_cache.commit(output)
        except BaseException as exc:  # handed to the step thread, which fails the request
            self._events.put(("error", exc))
        finally:
            self._events.put(("done", None))


class HFGenerateBackend(ModelBackend):
    """Any causal LM through transformers' generate (see the module docstring)."""

    name = "hf_generate"
    chunked_prefill = False

    def __init__(self, loaded: LoadedModel, cache: KVCacheManager) -> None:
        self.loaded, self._cache = loaded, cache

    @classmethod
    def unsupported(cls, loaded: LoadedModel, cache: KVCacheManager) -> str | None:
        return quantized_pool_refusal(cache)

    @classmethod
    def create(cls, loaded: LoadedModel, cache: KVCacheManager, config: SchedulerConfig) -> HFGenerateBackend:
        return cls(loaded, cache)

    @property
    def cache(self) -> KVCacheManager:
        return self._cache

    def blocks_for(self, num_tokens: int) -> int:
        return 0

    def blocks_to_open(self, state: SequenceState) -> int:
        return 0

    def open(self, state: SequenceState) -> None:
        left = state.params.max_new_tokens - len(state.generated) + 1  # generate never stops before we do
        thread = GenerateThread(self.loaded, self._cache, state.tokens(), left)
        cached = thread.start()
        state.kv, state.num_computed = thread, cached
        if state.cached_tokens is None:
            state.cached_tokens = cached

    def reserve(self, state: SequenceState, total_tokens: int) -> bool:
        return True

    def execute(self, chunks: Sequence[Chunk]) -> Tensor:
        rows = []
        for chunk in chunks:
            thread: GenerateThread = chunk.state.kv
            rows.append(thread.scores(chunk.token_ids()[0] if thread.waiting_for_token else None))
            thread.waiting_for_token = True
        return torch.stack(rows)

    def close(self, state: SequenceState, keep: bool) -> None:
        thread: GenerateThread = state.kv
        state.kv = None
        last = state.generated[-1] if thread.waiting_for_token and state.generated else None
        thread.stop(last)
