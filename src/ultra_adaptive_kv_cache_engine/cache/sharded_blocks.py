"""`ShardedBlockStore`: one rank's link between its KV-head slice (a `KVCacheManager`) and tiers of WHOLE blocks.

What the tiers hold does not depend on the tensor-parallel degree: a block is stored as the whole block
(all KV heads, shape ``(num_layers, 2, block_size, num_kv_heads, head_dim)``, the `KVSpec` block layout)
under its chained hash, whose namespace names the model, weights, tokenizer, dtype, block size, layout and
codec but never the rank or the degree. These are exactly the records that a degree-1 `KVCacheManager`
writes through its `LowerTiers`, so a prefix written at degree 2 is a hit at degree 1 or 4, and back.

Rank 0 owns the tiers (`lower` is given on rank 0 only; None there means no tiers) and takes every I/O
decision; other ranks follow through collectives:
- `fetch(tokens)`: rank 0 reads the blocks after the locally cached prefix, stopping at the first miss,
  and scatters each rank its head slice; every rank writes its slice into its own pool and indexes it.
- `publish(tokens)`: every rank gathers its slice of the cached blocks the store lacks to rank 0, which
  concatenates the heads and queues whole blocks (written in the background by `LowerTiers`).
- `persist()`: rank 0 waits for queued writes and flushes the tiers.

Invariants: all ranks run the same pool and index operations on the same token ids, so block ids agree on
every rank (`agreed_block_table` checks it); a record that cannot be read or decoded ends a fetch there (a
miss), never a divergence, because the count is decided once on rank 0 and broadcast. Not thread-safe
against other users of the same paged cache: callers serialise requests (as the session's lock does).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import KVCacheConfig
from ..memory import KVSpec
from ..metrics import LOGGER_NAME
from ..prefix import hash_blocks
from ..tiers import BlockRecord, RecordError
from .lower_tiers import LowerTiers
from .manager import KVCacheManager
from .sharded_group import ShardGroup

logger = logging.getLogger(LOGGER_NAME)

HEAD_AXIS = 4
"""Axis of the KV heads in a batch of blocks (n, num_layers, 2, block_size, heads, head_dim)."""


@dataclass(frozen=True)
class FetchResult:
    """Blocks of a prompt found in this rank's pool (`local_blocks`) and then loaded from the tiers."""

    local_blocks: int
    loaded_blocks: int


@dataclass(frozen=True)
class PublishResult:
    """Cached blocks the store lacked (`candidate_blocks`) and how many were queued (same on every rank)."""

    candidate_blocks: int
    queued_blocks: int


class ShardedBlockStore:
    """Whole blocks in `lower` (rank 0) <-> this rank's head slice in `paged`; see the module docstring.

    `paged` must have no `lower` of its own (this class moves the blocks). `transfer_blocks` bounds how many
    blocks move per collective (rank 0 then holds that many whole blocks at once).
    """

    def __init__(
        self, paged: KVCacheManager, group: ShardGroup, lower: LowerTiers | None, transfer_blocks: int = 64
    ) -> None:
        if not isinstance(paged, KVCacheManager) or not isinstance(group, ShardGroup):
            raise TypeError(f"paged must be a KVCacheManager and group a ShardGroup, got {paged!r}, {group!r}")
        if paged.lower is not None:
            raise ValueError("paged has tiers of its own (paged.lower); give them to ShardedBlockStore instead")
        if lower is not None and not isinstance(lower, LowerTiers):
            raise TypeError(f"lower must be a LowerTiers or None, got {type(lower).__name__}")
        if not group.is_first and lower is not None:
            raise ValueError(f"rank {group.rank} must not hold tiers: rank 0 does all tier I/O")
        if lower is not None and lower.store.namespace != paged.namespace.digest:
            raise ValueError(
                f"tier namespace {lower.store.namespace.hex()[:16]} is not the cache's "
                f"{paged.namespace.digest.hex()[:16]}"
            )
        if isinstance(transfer_blocks, bool) or not isinstance(transfer_blocks, int) or transfer_blocks < 1:
            raise ValueError(f"transfer_blocks={transfer_blocks!r} must be a positive integer")
        spec = paged.spec
        self.paged, self.group, self.lower = paged, group, lower
        self.transfer_blocks = transfer_blocks
        self.full_spec = KVSpec(
            spec.num_layers, spec.num_kv_heads * group.degree, spec.head_dim, spec.block_size, spec.dtype, "cpu"
        )
        self.heads = group.kv_head_range(self.full_spec.num_kv_heads)

    @classmethod
    def from_config(cls, paged: KVCacheManager, group: ShardGroup, config: KVCacheConfig) -> ShardedBlockStore:
        """Rank 0 holds the tiers of `config.tier_list` (under `paged`'s namespace); other ranks hold none."""
        lower = LowerTiers.from_config(config, paged.namespace.digest) if group.is_first else None
        return cls(paged, group, lower)

    # -- tiers -> pools ------------------------------------------------------------------------------------
    def fetch(self, token_ids: Sequence[int]) -> FetchResult:
        """Loads the blocks of `token_ids` after the locally cached prefix that rank 0's store holds.

        Collective: every rank calls it with the same tokens. Stops at the first block the store lacks or
        cannot decode, or when the pool has no free block left.
        """
        tokens = list(token_ids)
        bs = self.paged.block_size
        hashes = hash_blocks(tokens, self.paged.namespace, bs)
        local = self.paged.lookup(tokens).num_tokens // bs
        if local == len(hashes):
            return FetchResult(local, 0)
        seq = self.paged.new_sequence(tokens[: local * bs])  # pins the local prefix against eviction
        loaded = 0
        try:
            room = min(len(hashes) - local, self.paged.num_free_blocks)
            while loaded < room:
                start = local + loaded
                wanted = hashes[start : start + min(self.transfer_blocks, room - loaded)]
                full = self._read(wanted) if self.group.is_first else None
                count = self.group.broadcast_ints([full.shape[0]] if full is not None else None)[0]
                if count == 0:
                    break
                chunks = self._head_chunks(full) if full is not None else None
                part = self.group.scatter_from_first(chunks, self._slice_shape(count), self.paged.spec.dtype,
                                                     self.paged.kv.device)
                self._append(seq, tokens[start * bs : (start + count) * bs], part)
                loaded += count
                if count < len(wanted):
                    break
            self.paged.commit(seq)
        finally:
            self.paged.free(seq)
        return FetchResult(local, loaded)

    def _read(self, hashes: Sequence[bytes]) -> torch.Tensor:
        """Rank 0: whole blocks for the leading `hashes` the store holds and decodes, (n, *block_shape)."""
        records = self.lower.fetch_chain(hashes) if self.lower is not None else []
        shape = self.full_spec.block_shape
        host = torch.empty((len(records), *shape), dtype=self.full_spec.dtype)
        count = 0
        for record in records:
            if not self._decode(record, host[count]):
                break
            count += 1
        return host[:count]

    def _decode(self, record: BlockRecord, out: torch.Tensor) -> bool:
        if record.meta.shape != tuple(out.shape) or record.meta.torch_dtype != out.dtype:
            logger.warning(
                "block %s in the store is %s %s; expected %s %s: treated as a miss",
                record.block_hash.hex()[:16], record.meta.dtype, record.meta.shape, out.dtype, tuple(out.shape),
            )  # fmt: skip
            return False
        try:
            record.tensor(out=out)
        except RecordError as exc:
            logger.warning("block %s cannot be decoded (%s): treated as a miss", record.block_hash.hex()[:16], exc)
            return False
        return True

    def _head_chunks(self, full: torch.Tensor) -> list[torch.Tensor]:
        per_rank = len(self.heads)
        return [full.narrow(HEAD_AXIS, r * per_rank, per_rank).contiguous() for r in range(self.group.degree)]

    def _slice_shape(self, count: int) -> tuple[int, ...]:
        spec = self.paged.spec
        return (count, spec.num_layers, 2, spec.block_size, spec.num_kv_heads, spec.head_dim)

    def _append(self, seq: int, tokens: list[int], part: torch.Tensor) -> None:
        """Appends `part` (n, L, 2, B, H, D) as the KV of `tokens` to sequence `seq`."""
        count, layers, _, bs, heads, dim = part.shape
        per_layer = part.permute(1, 2, 4, 0, 3, 5).reshape(layers, 2, heads, count * bs, dim)
        keys = [per_layer[layer, 0] for layer in range(layers)]
        values = [per_layer[layer, 1] for layer in range(layers)]
        self.paged.append(seq, tokens, keys, values)

    # -- pools -> tiers ------------------------------------------------------------------------------------
    def publish(self, token_ids: Sequence[int]) -> PublishResult:
        """Writes the cached full blocks of `token_ids` that the store lacks, as whole blocks, from rank 0.

        Collective: every rank calls it with the same tokens (typically prompt + generated tokens).
        """
        match = self.paged.lookup(list(token_ids))
        missing_list: list[int] | None = None
        if self.group.is_first:
            store = self.lower.store if self.lower is not None else None
            missing_list = [i for i, h in enumerate(match.hashes) if store is not None and not store.contains(h)]
        missing = self.group.broadcast_ints(missing_list)
        queued = 0
        kv = self.paged.kv
        for start in range(0, len(missing), self.transfer_blocks):
            indices = missing[start : start + self.transfer_blocks]
            ids = torch.tensor([match.block_ids[i] for i in indices], dtype=torch.long, device=kv.device)
            parts = self.group.gather_to_first(kv.index_select(0, ids))
            if parts is not None and self.lower is not None:
                full = torch.cat(parts, dim=HEAD_AXIS)  # a fresh tensor: given away to the background writer
                queued += self.lower.write([match.hashes[i] for i in indices], full)
        total = self.group.broadcast_ints([queued] if self.group.is_first else None)[0]
        return PublishResult(len(missing), total)

    # -- durability and agreement --------------------------------------------------------------------------
    def persist(self) -> int:
        """Rank 0 waits for queued writes and flushes its tiers; every rank returns how many blocks that made
        durable. Collective."""
        flushed = None
        if self.group.is_first:
            flushed = [len(self.lower.flush().keys) if self.lower is not None else 0]
        return self.group.broadcast_ints(flushed)[0]

    def close(self) -> None:
        """Rank 0 finishes queued writes, flushes and stops its writer, without any collective (safe after the
        group broke: what was queued is still written whole or not at all)."""
        if self.lower is not None:
            self.lower.close()

    def agreed_block_table(self, token_ids: Sequence[int]) -> tuple[int, ...]:
        """Block ids of the cached prefix of `token_ids`, checked equal on every rank. Collective.

        Raises `RankDivergenceError` if the ranks' tables (or free-block counts) differ.
        """
        match = self.paged.lookup(list(token_ids))
        payload = b"".join(match.hashes) + repr((match.block_ids, self.paged.num_free_blocks)).encode()
        self.group.check_agree(payload, "the block table of a cached prefix")
        return match.block_ids
