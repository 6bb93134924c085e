"""`ShardedRunner`: one rank of a tensor-parallel model with its KV-head slice and the shared block store.

Per request, every rank runs, in the same order, with the same prompt (checked):
1. `fetch`: blocks past the pool's cached prefix are loaded from rank 0's tiers (whole blocks; each rank
   keeps its head slice);
2. `generate_with_prefix_cache` on this rank's shard (transformers' TP plan does the all-reduces); the
   paged cache reuses and commits blocks exactly as at degree 1, so block ids agree on every rank;
3. `publish`: new full blocks go to the tiers as whole blocks, then the block table is checked equal on
   every rank.
A peer that dies or stalls makes every collective (the model's included) raise `RankFailureError` within
the group's timeout; `close()` then flushes rank 0's store without any collective, so what was persisted
stays valid for the next start, at any degree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...cache.manager import KVCacheManager
from ...cache.sharded_blocks import ShardedBlockStore
from ...cache.sharded_group import ShardGroup
from ...cache.tier_list import namespace_codec
from ...config import KVCacheConfig
from ...prefix import pack_token_ids
from ..generation import GenerationResult, generate_with_prefix_cache
from ..loaded import LoadedModel

_PLAIN = (bool, int, float, str, type(None))


def _request_payload(prompt: list[int], kwargs: dict[str, Any]) -> bytes:
    """What every rank must agree on: the prompt, plain arguments by value, others by type only."""
    described = sorted((k, repr(v) if isinstance(v, _PLAIN) else type(v).__name__) for k, v in kwargs.items())
    return pack_token_ids(prompt) + repr(described).encode()


@dataclass(frozen=True)
class ShardedResult:
    """One request on one rank: the generation, what came from where, and the agreed block table."""

    generation: GenerationResult
    local_blocks: int
    fetched_blocks: int
    published_blocks: int
    block_table: tuple[int, ...]
    fetch_s: float
    publish_s: float

    @property
    def output_ids(self) -> list[int]:
        return self.generation.output_ids[0].tolist()

    @property
    def ttft_s(self) -> float:
        """From the request to the first token's logits, loading from the tiers (`fetch_s`) included."""
        return self.fetch_s + self.generation.ttft_s


class ShardedRunner:
    """Rank `group.rank` of `loaded` (a shard at degree > 1) over a pool of its KV heads.

    Rank 0 builds the tiers of `config.tier_list` (`ShardedBlockStore.from_config`), under the same namespace as
    a degree-1 session of the same model; other ranks hold none. The pool has `num_blocks` blocks (default: the
    memory budget, see `cache.budget`).
    """

    def __init__(
        self, loaded: LoadedModel, group: ShardGroup, config: KVCacheConfig, num_blocks: int | None = None
    ) -> None:
        spec = loaded.kv_spec(config.block_size, dtype=config.dtype)
        if spec.num_kv_heads * group.degree != loaded.model.config.num_key_value_heads:
            raise ValueError(
                f"model shard holds {spec.num_kv_heads} KV heads; a group of {group.degree} ranks needs "
                f"{loaded.model.config.num_key_value_heads} / {group.degree}"
            )
        namespace = loaded.namespace(spec, codec=namespace_codec(config), tenant_salt=config.tenant_salt)
        self.loaded, self.group = loaded, group
        self.paged = KVCacheManager(config, spec, num_blocks=num_blocks, namespace=namespace)
        self.blocks = ShardedBlockStore.from_config(self.paged, group, config)

    @property
    def namespace_digest(self) -> bytes:
        """The 32-byte namespace of every block this runner reads or writes (the same at every degree)."""
        return self.paged.namespace.digest

    def generate(self, prompt_ids: Sequence[int], **generate_kwargs: Any) -> ShardedResult:
        """Greedy or seeded generation for one prompt; collective (same prompt and arguments on every rank)."""
        prompt = [int(t) for t in prompt_ids]
        self.group.check_agree(_request_payload(prompt, generate_kwargs), "the request")
        started = time.perf_counter()
        fetched = self.blocks.fetch(prompt)
        fetch_s = time.perf_counter() - started
        with self.group.guard("the model's forward pass"), torch.inference_mode():
            generation = generate_with_prefix_cache(self.loaded.model, self.paged, [prompt], **generate_kwargs)
        started = time.perf_counter()
        tokens = generation.output_ids[0].tolist()
        published = self.blocks.publish(tokens)
        publish_s = time.perf_counter() - started
        table = self.blocks.agreed_block_table(tokens)
        return ShardedResult(
            generation, fetched.local_blocks, fetched.loaded_blocks, published.queued_blocks, table, fetch_s, publish_s
        )

    # -- serving: rank 0 takes requests, the other ranks follow --------------------------------------------
    def lead(self, prompt_ids: Sequence[int], max_new_tokens: int, persist: bool = False) -> tuple[ShardedResult, int]:
        """Rank 0: sends one greedy request to every rank (`follow`), runs it, persists if asked. Returns the
        result and the number of blocks made durable."""
        prompt = [int(t) for t in prompt_ids]
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1 or not prompt:
            raise ValueError(f"need a non-empty prompt and max_new_tokens >= 1, got {len(prompt)}, {max_new_tokens!r}")
        self.group.broadcast_ints([max_new_tokens, int(persist), *prompt])
        return self._serve(prompt, max_new_tokens, persist)

    def follow(self) -> tuple[ShardedResult, int] | None:
        """Ranks > 0: runs the next request rank 0 `lead`s; None once rank 0 `release_followers`."""
        request = self.group.broadcast_ints(None)
        if not request:
            return None
        return self._serve(list(request[2:]), request[0], bool(request[1]))

    def release_followers(self) -> None:
        """Rank 0: tells every `follow`ing rank that no request comes any more."""
        self.group.broadcast_ints([])

    def _serve(self, prompt: list[int], max_new_tokens: int, persist: bool) -> tuple[ShardedResult, int]:
        codec = self.loaded.tokenizer
        pad = codec.pad_token_id if codec.pad_token_id is not None else codec.eos_token_id
        result = self.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        return result, self.persist() if persist else 0

    def persist(self) -> int:
        """Makes rank 0's stored blocks durable; returns how many were flushed (on every rank). Collective."""
        return self.blocks.persist()

    def close(self) -> None:
        """Finishes rank 0's queued writes and flushes its tiers, without collectives (safe after the group
        broke)."""
        self.blocks.close()
