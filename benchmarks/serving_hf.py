"""transformers' own continuous batching in-process: `model.generate_batch` over token-id prompts, timed.

The baseline of bench_serving.py's GPU mode (b), and its CPU fallback when `transformers serve` cannot run.
It works across transformers versions that have `generate_batch` (5.x): the continuous-batching config is
passed only where the installed version takes one, and a version without `generate_batch` is reported, not
raised. Greedy; eos disabled (`eos_token_id=-1`) so every prompt yields `max_new_tokens` tokens, like the
fixed-length runs it is compared with.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Sequence
from typing import Any


def generate_batch(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   cb_options: dict[str, Any] | None = None, pad_token_id: int = 0) -> dict[str, Any]:
    """Runs `generate_batch` once; {"output_tokens", "seconds", "output_tok_s", "transformers"} or {"error"}."""
    import torch
    import transformers
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return {"error": f"transformers {transformers.__version__} has no generate_batch"}
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=pad_token_id)
    kwargs: dict[str, Any] = {"generation_config": config}
    params = inspect.signature(model.generate_batch).parameters
    if "progress_bar" in params:
        kwargs["progress_bar"] = False
    if cb_options and "continuous_batching_config" in params:
        from transformers import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**cb_options)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = model.generate_batch([list(p) for p in prompts], **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs.values())
    return {"output_tokens": tokens, "requests": len(outputs), "seconds": round(seconds, 3),
            "output_tok_s": round(tokens / seconds, 3) if seconds > 0 else None,
            "transformers": transformers.__version__}
