"""Shared helpers for the model-layer tests: tiny random Llamas, paged caches, the real SmolLM2.

Models are built once per test process (`functools.cache`); a test module wraps what it needs in a fixture.
"""

from __future__ import annotations

import functools

import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.loader import load_model
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama


def make_paged(lm: LoadedModel, block_size: int = 4, num_blocks: int = 64) -> KVCacheManager:
    """A CPU paged cache of `num_blocks` blocks for `lm`, namespaced by it."""
    config = KVCacheConfig(block_size=block_size, max_tokens=block_size * num_blocks, device=lm.device.type)
    spec = lm.kv_spec(block_size)
    return KVCacheManager(config, spec, num_blocks=num_blocks, namespace=lm.namespace(spec))


def random_ids(n: int, seed: int, low: int = 3, high: int = 300) -> list[int]:
    """`n` seeded token ids in [low, high) (no pad/bos/eos of the tiny byte tokenizer)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (n,), generator=generator).tolist()


def baseline_generate(lm: LoadedModel, ids: list[int] | torch.Tensor, max_new_tokens: int, mask=None) -> torch.Tensor:
    """Greedy `generate` with transformers' own DynamicCache and no reuse: the reference output."""
    batch = torch.tensor([ids]) if isinstance(ids, list) else ids
    mask = torch.ones_like(batch) if mask is None else mask
    with torch.no_grad():
        return lm.model.generate(batch, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class PrefillProbe:
    """Records the number of input columns of every forward of a model (a real forward pre-hook)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.widths: list[int] = []
        self._handle = lm.model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.widths.append(int(ids.shape[1]))

    def close(self) -> None:
        self._handle.remove()


@functools.cache
def tiny_model() -> LoadedModel:
    """The default tiny random Llama (2 layers, hidden 64, 4 heads, 2 KV heads, vocab 320, seed 0)."""
    return build_tiny_llama(TinyLlamaSpec())


@functools.cache
def smollm_model() -> LoadedModel:
    """The real embedded SmolLM2-135M-Instruct, converted once per machine into the user model cache folder
    ($UAKV_CACHE_DIR/models or ~/.cache/ultra-adaptive-kv-cache/models)."""
    return load_model(KVCacheConfig(device="cpu"))
