"""The model and engine of bench_serving.py's GPU mode, built alike for the server subprocess and the in-process
parts: a seeded random Llama (Llama-3-8B shape, bf16 on CUDA; tiny, float32 on the CPU for `--dry-run-cpu`),
a byte codec without eos (`BenchCodec`: every request yields exactly its max_tokens), the engine's config,
and the prompts (random ASCII, one token per byte)."""

from __future__ import annotations

import argparse
import random
import string
from collections.abc import Sequence
from typing import Any


class BenchCodec:
    """The tiny Llama's byte codec with no eos, decoding every token to one character (so each decode step
    streams one chunk): bytes as bytes, other ids as a CJK ideograph."""

    def __init__(self) -> None:
        from ultra_adaptive_kv_cache_engine.model.text import ByteTextCodec

        self.bytes = ByteTextCodec()
        self.pad_token_id = self.bytes.pad_token_id
        self.identity = self.bytes.identity + "-bench-no-eos"
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self.bytes.encode(text)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(0x4E00 + i % 0x5000) for i in token_ids)

    def chat(self, messages: Any, add_generation_prompt: bool = True) -> list[int]:
        return self.bytes.chat(messages, add_generation_prompt)


def build_model(dry_run: bool, max_tokens: int, seed: int, init_std: float) -> Any:
    """The seeded random LlamaForCausalLM (Llama-3-8B shape, bf16 on CUDA; tiny, float32 on the CPU)."""
    import torch
    from e2e_model import build_hf

    device = torch.device("cpu" if dry_run else "cuda")
    dtype = torch.float32 if dry_run else torch.bfloat16
    spec = argparse.Namespace(quick=dry_run, prompt_tokens=max_tokens, seed=seed, init_std=init_std)
    return build_hf(spec, device, dtype)


def loaded_model(hf: Any, dry_run: bool, seed: int, init_std: float) -> Any:
    """`hf` as the engine's LoadedModel, with `BenchCodec` as its tokenizer."""
    from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel

    shape = "tiny" if dry_run else "llama3-8b-shape"
    return LoadedModel(model=hf, tokenizer=BenchCodec(), model_id=f"random-{shape}",
                       weights_fingerprint=f"random-{shape}-seed{seed}-std{init_std}", dtype=hf.dtype,
                       device=hf.device, max_context=int(hf.config.max_position_embeddings))


def kv_config(device: str, block_size: int, pool_bytes: int, **overrides: Any) -> Any:
    """The engine's config, the same for the server and the in-process engine: the defaults, but for the pool's
    size and block size (and `overrides`: other `KVCacheConfig` fields of a variant)."""
    from ultra_adaptive_kv_cache_engine.config import KVCacheConfig

    return KVCacheConfig(device=device, block_size=block_size, max_memory=pool_bytes, reject_non_finite=False,
                         **overrides)


def prompts(n: int, length: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + " "
    return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]
