"""`load_sharded_model`: one rank's shard of a model folder, through transformers' own tensor-parallel plan.

At degree N > 1 the model is loaded with ``DistributedConfig(tp_plan="auto")``: q/k/v and the MLP's
gate/up are split column-wise, o/down row-wise (an all-reduce after each), so rank r computes the KV of the
contiguous head slice `ShardGroup.kv_head_range` and `kv_shape_of` reports ``num_kv_heads / N`` heads.
At degree 1 it is a plain load. Either way the model's identity (folder name, weights fingerprint of the
files, tokenizer identity) does not depend on the degree, so neither do the prefix namespace and the block
hashes: what one degree stores, every degree finds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...cache.sharded_group import ShardGroup
from ...config import KVCacheConfig
from ..loaded import LoadedModel, kv_shape_of, max_context_of
from ..loader import folder_fingerprint, tokenizer_identity
from ..text import HFTextCodec, TextCodec


def _check_shardable(config: Any, folder: Path, degree: int) -> None:
    """ValueError unless the architecture has a tensor-parallel plan and `degree` divides its heads."""
    if not getattr(config, "base_model_tp_plan", None):
        raise ValueError(
            f"model {str(folder)!r} ({type(config).__name__}) has no tensor-parallel plan in transformers; "
            "it can only run at degree 1"
        )
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    if heads % degree or kv_heads % degree:
        raise ValueError(
            f"model {str(folder)!r} has {heads} attention heads and {kv_heads} KV heads; a tensor-parallel "
            f"degree of {degree} must divide both"
        )


def _load(folder: Path, group: ShardGroup, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    options: dict[str, Any] = {"dtype": dtype, "local_files_only": True, "use_safetensors": True}
    if group.degree > 1:
        _check_shardable(AutoConfig.from_pretrained(folder, local_files_only=True), folder, group.degree)
        options["distributed_config"] = DistributedConfig(tp_plan="auto", tp_size=group.degree)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **options)
    except (OSError, KeyError) as exc:
        raise ValueError(f"cannot load a causal LM from {str(folder)!r}: {exc}") from exc
    if group.degree == 1:
        model = model.to(group.device)
    elif (model.tp_size or 1) != group.degree:
        raise ValueError(f"transformers sharded {str(folder)!r} over {model.tp_size} ranks, expected {group.degree}")
    return model.eval()


def load_sharded_model(
    folder: str | Path, group: ShardGroup, config: KVCacheConfig, tokenizer: TextCodec | None = None
) -> LoadedModel:
    """This rank's shard of the safetensors model in `folder` (dtype `config.dtype`, default float32).

    `tokenizer` defaults to the folder's Hugging Face tokenizer; pass one for folders without tokenizer
    files (e.g. `ByteTextCodec` for a saved tiny Llama). Fingerprint records go under `config.model_dir`.
    At degree > 1 torch.distributed must be initialised (`ShardGroup.from_environment`).
    """
    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"folder={str(folder)!r} has no config.json; expected a Hugging Face model folder")
    dtype = torch.float32 if config.dtype is None else config.dtype.torch
    model = _load(folder, group, dtype)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = HFTextCodec(AutoTokenizer.from_pretrained(folder, local_files_only=True), tokenizer_identity(folder))
    kv_shape_of(model)  # raises if the shard's heads do not divide
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=folder.name,
        weights_fingerprint=folder_fingerprint(folder, config.model_dir),
        dtype=dtype,
        device=group.device,
        max_context=max_context_of(model),
        path=folder,
    )
