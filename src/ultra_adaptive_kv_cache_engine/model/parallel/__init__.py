"""Tensor parallelism (L3, under model/): a model sharded by transformers' TP plan over torch.distributed
ranks, each holding its slice of the KV heads, over tiers that hold whole blocks (degree-independent).

Names are loaded on first use, so importing this package does not import transformers.
"""

from __future__ import annotations

from ...lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "load_sharded_model": ".loading",
    "ShardedRunner": ".runner",
    "ShardedResult": ".runner",
    "RankLauncher": ".launcher",
    "LaunchResult": ".launcher",
    "free_port": ".launcher",
    "PromptJob": ".prompt_job",
    "run_prompt_job": ".prompt_job",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
