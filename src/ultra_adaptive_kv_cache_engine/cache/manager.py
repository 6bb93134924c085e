"""`KVCacheManager`: the one façade every caller of the KV cache goes through.

It composes the block pool (`memory.BlockPool`, sized from the memory budget: `cache.budget`), the prefix
index (`prefix.PrefixIndex`), the eviction policy the configured strategy names (the pool asks it for victims)
and the ordered tiers below the pool (`LowerTiers`, built from `config.tier_list`). The engine, the model
backends, the Hugging Face cache adapter and the tensor-parallel runner use only its public methods:
`lookup`, `new_sequence` (reserve a sequence, reusing and promoting its cached prefix), `append`, `commit`,
`fork`, `free`, `allocate_scratch` / `free_scratch`, `commit_named` / `acquire_named` (`NamedChains`: pressed
chains), `read_layer`, `persist`, `durable_blocks`, `held_blocks`, `stats`, `close`.

Ownership and invariants (all public methods hold `self._lock`):
- A sequence holds one reference to each block in its block table; the table covers exactly
  ``ceil(num_kv_tokens / block_size)`` blocks, token ``t``'s KV lives in block ``table[t // block_size]`` at
  offset ``t % block_size``.
- Only FULL blocks are ever named (hashed) and entered in the prefix index; a named block is never written
  again. A partial last block shared by a fork is copied before it is written (copy-on-write).
- A block holds a hash iff the index maps that hash to it (the cache keeps pool and index in step; when the
  pool reuses a cached free block, the eviction callback removes its hash from the index).
- Freed blocks keep their content and name until the pool reuses their slot, so a later sequence with the
  same prefix reuses them (`lookup` / `new_sequence`).
- Errors (bad shapes, dtypes, tokens, unknown sequence, out of blocks) raise before anything changes.

With `lower` (see `LowerTiers`), committed blocks are written through to the tiers below the pool, and
`new_sequence` continues a prefix match into those tiers, promoting what it finds into pool blocks (that part of
the class, and the tiers' façade, is `manager_tiers.TierLink`; pressed chains are `manager_named.NamedChains`).

The clock the policy reads is the request tick: one value per `new_sequence`, so every event of one request
shares a tick (as in the replay lab).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import KVCacheConfig
from ..memory import BlockPool, KVSpec, MemoryAllocator, OutOfBlocksError
from ..metrics import LOGGER_NAME, Counters
from ..policies import EvictionPolicy, has_policy, make_policy
from ..prefix import Namespace, PrefixIndex, hash_block, hash_blocks
from ..prefix.chain_memo import ChainMemo
from .budget import PoolBudget, plan_pool
from .kv_input import check_kv, gather_layer, token_list, usage_dict
from .lower_tiers import LowerTiers
from .manager_named import NamedChains
from .manager_tiers import TierLink
from .namespaces import check_namespace, default_namespace
from .results import HeldBlocks, PrefixMatch, SequenceHits


@dataclass(slots=True)
class _Sequence:
    tokens: list[int]  # every token recorded; tokens[num_kv:] still wait for their KV
    block_ids: list[int]
    hashes: list[bytes]  # names of the leading full blocks (reused or committed)
    num_kv: int
    num_cached: int
    num_promoted: int = 0
    promoted_from: tuple[str, ...] = ()
    refused: bool = False  # the policy refused one of its blocks: the rest of it is never named


class KVCacheManager(NamedChains, TierLink):
    """Paged KV for sequences, with prefix caching, over a `BlockPool` of blocks of `spec`, and tiers below it.

    `num_blocks` (tests, benchmarks) fixes the pool size; otherwise the memory budget decides (`plan_pool`:
    `config.max_memory`, else `gpu_memory_utilization` of free CUDA memory, else a share of free RAM), and a
    budget the device cannot hold raises ValueError before anything is allocated. `spec.block_size` must equal
    `config.block_size`; `namespace` names the model, weights, tokenizer and tenant (see `Namespace`);
    `allocator` provides the pool's backing tensor (see `BlockPool`); `lower` are the tiers below the pool
    (`from_config` builds them from `config.tier_list`).
    """

    def __init__(
        self,
        config: KVCacheConfig,
        spec: KVSpec,
        num_blocks: int | None = None,
        namespace: Namespace | None = None,
        allocator: MemoryAllocator | None = None,
        lower: LowerTiers | None = None,
    ) -> None:
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec={spec!r} must be a KVSpec")
        if spec.block_size != config.block_size:
            raise ValueError(f"spec.block_size={spec.block_size} must equal config.block_size={config.block_size}")
        if config.dtype is not None and config.dtype.torch != spec.dtype:
            raise ValueError(f"spec.dtype={spec.dtype} must equal config.dtype={config.dtype.value}")
        if config.kv_dtype != spec.pool_format:
            raise ValueError(f"spec.pool_format={spec.pool_format!r} must equal config.kv_dtype={config.kv_dtype!r}")
        namespace = namespace if namespace is not None else default_namespace(config, spec)
        check_namespace(namespace, spec)
        self.config = config
        self.logger = logging.getLogger(LOGGER_NAME)
        self.counters = Counters()
        self._lock = threading.RLock()
        self.spec = spec
        self.namespace = namespace
        self.block_size = spec.block_size
        self.budget: PoolBudget = plan_pool(config, spec, num_blocks)
        self._tick = 0
        self.policy = self._make_policy(self.budget.num_blocks)
        self.pool = BlockPool(spec, self.budget.num_blocks, allocator, on_evict=self._on_evict, policy=self.policy)
        self.index = PrefixIndex()
        self._chains = ChainMemo(namespace)  # a prompt looked up twice (count, then open) is hashed once
        self._sequences: dict[int, _Sequence] = {}
        self._next_seq_id = 0
        self.lower = lower

    @classmethod
    def from_config(
        cls, config: KVCacheConfig, spec: KVSpec, namespace: Namespace, num_blocks: int | None = None,
        allocator: MemoryAllocator | None = None,
    ) -> KVCacheManager:
        """A manager whose tiers below the pool are those of `config.tier_list` (none when the list is empty)."""
        return cls(config, spec, num_blocks, namespace, allocator, LowerTiers.from_config(config, namespace.digest))

    def _make_policy(self, num_blocks: int) -> EvictionPolicy | None:
        name = self.config.cache_strategy.value
        if not has_policy(name):
            self.logger.info("strategy %r registers no eviction policy; the pool evicts in free order", name)
            return None
        return make_policy(name, capacity=num_blocks, clock=self._request_tick)

    def _request_tick(self) -> float:
        return float(self._tick)

    # -- prefix reuse -------------------------------------------------------------------------------------
    def lookup(self, token_ids: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of `token_ids` in full blocks. Changes no ref count."""
        tokens = token_list(token_ids)
        with self._lock:
            return self._match(tokens, len(tokens) // self.block_size)

    def _match(self, tokens: list[int], max_blocks: int) -> PrefixMatch:
        """Hashes block by block and stops at the first miss (no hashing past it)."""
        block_ids: list[int] = []
        hashes: list[bytes] = []
        for parent in self._chains.names(tokens, max_blocks):
            block_id = self.index.get(parent)
            if block_id is None:
                break
            block_ids.append(block_id)
            hashes.append(parent)
        return PrefixMatch(tuple(block_ids), tuple(hashes), len(block_ids) * self.block_size)

    def new_sequence(self, token_ids: Sequence[int] = (), *, max_cached_tokens: int | None = None) -> int:
        """A new sequence recording `token_ids`, reusing (incref) the longest cached prefix of them.

        `max_cached_tokens` caps the reuse (e.g. ``len(prompt) - 1`` so that the model still computes the last
        prompt token's logits). The caller then `append`s the KV of ``token_ids[num_cached_tokens(id):]``.
        """
        tokens = token_list(token_ids)
        limit = len(tokens) if max_cached_tokens is None else max_cached_tokens
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_cached_tokens={max_cached_tokens!r} must be a non-negative integer or None")
        with self._lock:
            self._tick += 1
            max_blocks = min(len(tokens), limit) // self.block_size
            match = self._match(tokens, max_blocks)
            for block_id in match.block_ids:
                self.pool.incref(block_id)
            in_pool = match.num_tokens
            if self.lower is not None and len(match.block_ids) < max_blocks:
                match = self._promote(tokens, match, max_blocks)
            promoted = (match.num_tokens - in_pool) // self.block_size
            where = self.lower.located[:promoted] if promoted and self.lower is not None else ()
            seq_id = self._next_seq_id
            self._next_seq_id += 1
            self._sequences[seq_id] = _Sequence(
                tokens, list(match.block_ids), list(match.hashes), match.num_tokens, match.num_tokens,
                match.num_tokens - in_pool, tuple(where) + ("lower",) * (promoted - len(where)),
            )
            self.counters.add("prefix_query_tokens", len(tokens))
            self.counters.add("prefix_hit_tokens", match.num_tokens)
            return seq_id

    # -- the pool as kernels and runners see it ----------------------------------------------------------
    @property
    def kv(self) -> torch.Tensor:
        """The pool tensor (block-major, see `KVSpec`): kernels read and write it in blocks the caller holds."""
        return self.pool.kv

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks `allocate_scratch` or a new sequence can take now (cached free blocks included)."""
        with self._lock:
            return self.pool.num_free

    def allocate_scratch(self, count: int) -> list[int]:
        """`count` unnamed blocks held by the caller (e.g. the slots decoding will fill), or OutOfBlocksError
        (nothing taken). The caller writes only these blocks and gives them back with `free_scratch`."""
        with self._lock:
            blocks = self.pool.allocate_many(count)
            if blocks is None:
                raise OutOfBlocksError(
                    f"need {count} scratch block(s) of {self.block_size} tokens, the pool has {self.pool.num_free} "
                    f"of {self.pool.num_blocks} free; free sequences, enlarge the pool or lower max_new_tokens"
                )
            return blocks

    def free_scratch(self, block_ids: Sequence[int]) -> None:
        """Gives back blocks from `allocate_scratch`."""
        with self._lock:
            self.pool.free(list(block_ids))

    def hash_prompt(self, token_ids: Sequence[int]) -> list[bytes]:
        """The chained names of the full blocks of `token_ids` under this cache's namespace."""
        return hash_blocks(token_list(token_ids), self.namespace, self.block_size)

    # -- writing ------------------------------------------------------------------------------------------
    def append(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        keys: Sequence[torch.Tensor] | None,
        values: Sequence[torch.Tensor] | None,
    ) -> None:
        """Appends the KV of `token_ids`: ``keys[l]``/``values[l]`` of shape (num_kv_heads, T, head_dim).

        With `keys` and `values` both None the tokens' blocks are reserved, not written: the caller writes their
        KV into the pool (a model's forward, or a quantized pool's sealed slabs) before `commit` names them. A
        quantized pool (`spec.pool_format`) takes only that form. Tokens already recorded but without KV (from
        `new_sequence`) must match `token_ids` where they overlap. Raises ValueError/TypeError on bad input and
        `OutOfBlocksError` when the pool lacks free blocks, in both cases before anything changes.
        """
        tokens = token_list(token_ids)
        reserve = keys is None and values is None
        with self._lock:
            seq = self._sequence(seq_id)
            if not reserve and self.spec.pool_format is not None:
                raise ValueError(f"the pool is quantized (kv_dtype={self.spec.pool_format!r}): its blocks are written "
                                 "by the paged Llama backend's forward; append(seq_id, tokens, None, None) reserves")
            if not reserve:
                check_kv(self.spec, keys, values, len(tokens), self.config.reject_non_finite)  # type: ignore[arg-type]
            pending = seq.tokens[seq.num_kv :]
            overlap = min(len(pending), len(tokens))
            if tokens[:overlap] != pending[:overlap]:
                raise ValueError(
                    f"token_ids {tokens[:overlap]} differ from the tokens recorded for sequence {seq_id} "
                    f"at positions {seq.num_kv}..{seq.num_kv + overlap - 1}: {pending[:overlap]}"
                )
            if not tokens:
                return
            self._grow(seq, seq.num_kv + len(tokens))
            if not reserve:
                self._write(seq, seq.num_kv, keys, values)  # type: ignore[arg-type]
            seq.tokens.extend(tokens[overlap:])
            seq.num_kv += len(tokens)

    def _grow(self, seq: _Sequence, total_tokens: int) -> None:
        """Gives `seq` enough blocks for `total_tokens`, copying a shared partial last block first."""
        missing = math.ceil(total_tokens / self.block_size) - len(seq.block_ids)
        cow = seq.num_kv % self.block_size != 0 and self.pool.ref_count(seq.block_ids[-1]) > 1
        new_blocks = self.pool.allocate_many(missing + int(cow))
        if new_blocks is None:
            raise OutOfBlocksError(
                f"need {missing + int(cow)} free block(s) of {self.block_size} tokens, the pool has "
                f"{self.pool.num_free} of {self.pool.num_blocks} free; free sequences or enlarge the pool"
            )
        if cow:
            shared, copy = seq.block_ids[-1], new_blocks.pop(0)
            self.pool.copy_block(shared, copy)
            self.pool.decref(shared)
            seq.block_ids[-1] = copy
            self.counters.add("copy_on_write_blocks")
        seq.block_ids.extend(new_blocks)

    def _write(self, seq: _Sequence, start: int, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        kv = self.pool.kv
        count = keys[0].shape[1]
        positions = torch.arange(start, start + count, device=kv.device)
        table = torch.tensor(seq.block_ids, dtype=torch.long).to(kv.device, non_blocking=True)
        blocks, offsets = table[positions // self.block_size], positions % self.block_size
        src = torch.stack([torch.stack(list(keys)), torch.stack(list(values))], dim=1)  # (L, 2, H, T, D)
        kv[blocks, :, :, offsets] = src.permute(3, 0, 1, 2, 4).to(kv.device)  # (T, L, 2, H, D)

    def commit(self, seq_id: int) -> int:
        """Names every full block of the sequence and enters it in the prefix index; returns how many new.

        A block whose hash already names another block (the same content computed twice) stays unnamed. The
        policy is asked (`admit`) once per new block; a refusal leaves that block and every later block of the
        sequence unnamed (a child is worthless without its parent).
        """
        with self._lock:
            seq = self._sequence(seq_id)
            if seq.refused:
                return 0
            bs = self.block_size
            parent = seq.hashes[-1] if seq.hashes else None
            new_ids: list[int] = []
            new_hashes: list[bytes] = []
            for i in range(len(seq.hashes), seq.num_kv // bs):
                parent = hash_block(parent, seq.tokens[i * bs : (i + 1) * bs], self.namespace)
                block_id = seq.block_ids[i]
                if parent not in self.index:
                    if not self.pool.admit(parent):
                        seq.refused = True
                        self.counters.add("admission_refused_blocks")
                        break
                    self.index.insert(parent, block_id)
                    self.pool.set_block_hash(block_id, parent)
                    new_ids.append(block_id)
                    new_hashes.append(parent)
                seq.hashes.append(parent)
            if self.lower is not None and new_ids and not self.lower.write_on_evict:
                # non_blocking: a pageable copy that does not wait for the step's kernels (no stream sync)
                index = torch.tensor(new_ids, dtype=torch.long).to(self.pool.kv.device, non_blocking=True)
                self.lower.write(new_hashes, self.pool.kv.index_select(0, index))
            self.counters.add("committed_blocks", len(new_ids))
            return len(new_ids)

    def fork(self, seq_id: int) -> int:
        """A new sequence sharing all blocks of `seq_id` (ref counts up); its tokens are a copy."""
        with self._lock:
            seq = self._sequence(seq_id)
            for block_id in seq.block_ids:
                self.pool.incref(block_id)
            child = self._next_seq_id
            self._next_seq_id += 1
            self._sequences[child] = _Sequence(
                list(seq.tokens), list(seq.block_ids), list(seq.hashes), seq.num_kv, seq.num_kv
            )
            return child

    def free(self, seq_id: int) -> None:
        """Ends a sequence: drops its block references, last block first; named blocks stay reusable."""
        with self._lock:
            seq = self._sequence(seq_id)
            self.pool.free(seq.block_ids)
            del self._sequences[seq_id]

    # -- reading ------------------------------------------------------------------------------------------
    def read_layer(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer` for every token with KV: contiguous (num_kv_heads, tokens, head_dim)."""
        with self._lock:
            seq = self._sequence(seq_id)
            return self._gather(seq.block_ids, seq.num_kv, layer)

    def read_prefix(self, match: PrefixMatch, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `layer` for the blocks of `match`; ValueError if a block was reused since."""
        if not isinstance(match, PrefixMatch):
            raise TypeError(f"match must be a PrefixMatch, got {type(match).__name__}")
        with self._lock:
            for block_id, block_hash in zip(match.block_ids, match.hashes, strict=True):
                if self.pool.block_hash(block_id) != block_hash:
                    raise ValueError(f"match is stale: block {block_id} no longer holds the matched content")
            return self._gather(list(match.block_ids), match.num_tokens, layer)

    def _gather(self, block_ids: list[int], num_tokens: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A quantized pool's blocks are dequantised (full blocks only: ValueError for a partial one)."""
        return gather_layer(self.pool.kv, self.spec, block_ids, num_tokens, layer)

    # -- inspection ---------------------------------------------------------------------------------------
    def sequence_hits(self, seq_id: int) -> SequenceHits:
        """Where the sequence's reused prefix came from (pool or tiers below it)."""
        with self._lock:
            seq = self._sequence(seq_id)
            in_pool = seq.num_cached - seq.num_promoted
            return SequenceHits(in_pool, seq.num_promoted, ("pool",) * (in_pool // self.block_size) + seq.promoted_from)

    def num_cached_tokens(self, seq_id: int) -> int:
        """Leading tokens whose KV the sequence reused when it was created (a multiple of block_size for a
        `new_sequence`; all its tokens with KV for a `fork`)."""
        with self._lock:
            return self._sequence(seq_id).num_cached

    def num_kv_tokens(self, seq_id: int) -> int:
        """Leading tokens of the sequence that have KV now."""
        with self._lock:
            return self._sequence(seq_id).num_kv

    def sequence_tokens(self, seq_id: int) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._sequence(seq_id).tokens)

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._sequence(seq_id).block_ids)

    def held_blocks(self) -> HeldBlocks:
        """The names of the blocks this cache serves without a shared tier, for reports (the server's cache digest),
        never for the request path: the pool index's keys (a C-speed copy, under the lock) and the local tiers'
        (`LowerTiers.local_keys`), with the pool's occupancy."""
        with self._lock:
            pool, free, sequences = tuple(self.index), self.pool.num_free, len(self._sequences)
        local = self.lower.local_keys() if self.lower is not None else ()
        return HeldBlocks(pool, local, self.pool.num_blocks, free, sequences)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            stats: dict[str, Any] = {"strategy": self.config.cache_strategy.value,
                                     "pool_budget_bytes": self.budget.budget_bytes, "pool_budget": self.budget.source}
            counters = self.counters.snapshot()
            queried, hit = counters.get("prefix_query_tokens", 0), counters.get("prefix_hit_tokens", 0)
            stats.update(
                num_blocks=self.pool.num_blocks,
                block_size=self.block_size,
                bytes_per_block=self.spec.bytes_per_block,
                free_blocks=self.pool.num_free,
                indexed_blocks=len(self.index),
                sequences=len(self._sequences),
                prefix_query_tokens=queried,
                prefix_hit_tokens=hit,
                prefix_hit_rate=hit / queried if queried else 0.0,
                committed_blocks=counters.get("committed_blocks", 0),
                copy_on_write_blocks=counters.get("copy_on_write_blocks", 0),
                block_evictions=self.pool.num_evictions,
                tier_hit_tokens=counters.get("tier_hit_tokens", 0),
                evicted_written_blocks=counters.get("evicted_written_blocks", 0),
            )
            if self.lower is not None:
                stats["tiers"] = usage_dict(self.lower.usage())
            return stats

    def _sequence(self, seq_id: int) -> _Sequence:
        seq = self._sequences.get(seq_id)
        if seq is None:
            raise ValueError(f"seq_id={seq_id!r} is not a live sequence; live: {sorted(self._sequences)[:16]}")
        return seq
