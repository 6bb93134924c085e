"""`PagedKVCache`: the seed's paged cache, a `BaseKVCache` (nn.Module) whose KV lives in paged blocks.

It is the seed's hierarchy made real: `PagedKVCache(config)` works as written (a default spec: one layer,
eight KV heads of 64, `config.block_size` tokens per block, `config.dtype` or float32, on CPU), keeps the
seed's content-addressed `store` / `retrieve` (inherited from `BaseKVCache`, bounded by `max_tokens`), and
holds its sequences' KV in a `KVCacheManager` (`self.manager`): block pool sized from the memory budget, prefix
index, the configured policy and the tiers of `config.tier_list`. The sequence methods below are the
manager's, so code written for either works on both. `PagedKVCache.over(manager)` wraps a manager that exists
already: `UltraAdaptiveKVCacheEngine.paged_cache()` is the seed's class over the engine's own blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import KVCacheConfig
from ..memory import KVSpec, MemoryAllocator
from ..prefix import Namespace
from .base_cache import BaseKVCache
from .manager import KVCacheManager, PrefixMatch, default_namespace

DEFAULT_LAYERS, DEFAULT_KV_HEADS, DEFAULT_HEAD_DIM = 1, 8, 64


def default_spec(config: KVCacheConfig) -> KVSpec:
    """The spec of a `PagedKVCache(config)` built without one (the seed's (1, 8, 64) tensors per token)."""
    dtype = config.dtype.torch if config.dtype is not None else torch.float32
    return KVSpec(DEFAULT_LAYERS, DEFAULT_KV_HEADS, DEFAULT_HEAD_DIM, config.block_size, dtype)


class PagedKVCache(BaseKVCache):
    """Paged KV for sequences (through `self.manager`) plus the seed's tensor store; see the module docstring.

    `spec` defaults to `default_spec(config)`; `num_blocks` fixes the pool size (default: the memory budget);
    `tiers=True` builds the tiers of `config.tier_list` below the pool (default: none, a pool only);
    `manager` uses that manager as it is (see `over`).
    """

    def __init__(
        self,
        config: KVCacheConfig,
        spec: KVSpec | None = None,
        num_blocks: int | None = None,
        namespace: Namespace | None = None,
        allocator: MemoryAllocator | None = None,
        tiers: bool = False,
        manager: KVCacheManager | None = None,
    ) -> None:
        super().__init__(config)
        if manager is not None:
            if (spec, num_blocks, namespace, allocator, tiers) != (None, None, None, None, False):
                raise ValueError("PagedKVCache(manager=...) takes the manager as it is; expected no spec, "
                                 "num_blocks, namespace, allocator or tiers beside it")
            self.manager = manager
            return
        spec = spec if spec is not None else default_spec(config)
        if tiers:
            ns = namespace if namespace is not None else default_namespace(config, spec)
            self.manager = KVCacheManager.from_config(config, spec, ns, num_blocks, allocator)
        else:
            self.manager = KVCacheManager(config, spec, num_blocks, namespace, allocator)

    @classmethod
    def over(cls, manager: KVCacheManager) -> PagedKVCache:
        """The seed's paged cache over `manager` (its config, blocks, index, policy and tiers): what one does
        through it, the manager's other users see, and the other way round."""
        if not isinstance(manager, KVCacheManager):
            raise TypeError(f"manager must be a KVCacheManager, got {type(manager).__name__}")
        return cls(manager.config, manager=manager)

    @property
    def spec(self) -> KVSpec:
        return self.manager.spec

    @property
    def block_size(self) -> int:
        return self.manager.block_size

    def lookup(self, token_ids: Sequence[int]) -> PrefixMatch:
        return self.manager.lookup(token_ids)

    def new_sequence(self, token_ids: Sequence[int] = (), *, max_cached_tokens: int | None = None) -> int:
        return self.manager.new_sequence(token_ids, max_cached_tokens=max_cached_tokens)

    def append(self, seq_id: int, token_ids: Sequence[int], keys: Sequence[torch.Tensor],
               values: Sequence[torch.Tensor]) -> None:
        self.manager.append(seq_id, token_ids, keys, values)

    def commit(self, seq_id: int) -> int:
        return self.manager.commit(seq_id)

    def fork(self, seq_id: int) -> int:
        return self.manager.fork(seq_id)

    def free(self, seq_id: int) -> None:
        self.manager.free(seq_id)

    def read_layer(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.manager.read_layer(seq_id, layer)

    def num_cached_tokens(self, seq_id: int) -> int:
        return self.manager.num_cached_tokens(seq_id)

    def persist(self) -> Any:
        return self.manager.persist()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "paged": self.manager.stats()}
