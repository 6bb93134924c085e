"""Tensor parallelism (L3, under model/): a model sharded by transformers' TP plan over torch.distributed
ranks, each holding its slice of the KV heads, over tiers that hold whole blocks (degree-independent).

Names are loaded on first use, so importing this package does not import transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
