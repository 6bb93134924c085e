"""`NamedChains`: the part of `KVCacheManager` that names and finds blocks by a chain the CALLER computed.

A pressed prompt's blocks (`compression.presses`) hold KV that is not the KV of any prefix of tokens, so they
cannot be named by `commit` (which hashes the sequence's tokens block by block). The press names them itself
(`pressed_block_hashes`: the whole prompt, the press, its budget) and hands the names here:
- `commit_named(block_ids, hashes)` names blocks the caller holds (from `allocate_scratch`) and enters them in
  the prefix index; after `free_scratch` they stay cached in the pool like any freed named block, evicted by
  the same policy;
- `acquire_named(hashes, num_tokens)` takes one reference to EVERY block of a chain (all or nothing: a part of
  a pressed chain stands for no prefix) and returns them; the caller gives them back with `free_scratch`.
Like committed blocks, named ones are written through to the tiers below the pool (their bytes as the pool
holds them), and `acquire_named` promotes the blocks of a chain the pool lacks from there (all of them or the
request takes nothing), so a pressed chain survives an eviction from the pool, a restart (disk) and reaches
other servers (Redis).
Same lock, same pool and index as the rest of the manager (this is a part of its class, in a file of its own).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .manager_state import ManagerState


class NamedChains(ManagerState):
    """Blocks named by caller-given chains (see the module docstring); mixed into `KVCacheManager`."""

    def commit_named(self, block_ids: Sequence[int], hashes: Sequence[bytes]) -> int:
        """Names the held, unnamed `block_ids` by `hashes` (pairwise, in chain order); returns how many are new.
        A name already in the index stays with its block (the same chain computed twice: this copy stays
        unnamed); the policy's refusal (`admit`) leaves that block and every later one unnamed."""
        if len(block_ids) != len(hashes):
            raise ValueError(f"{len(block_ids)} block ids for {len(hashes)} names; expected one name per block")
        with self._lock:
            for block_id in block_ids:
                if self.pool.ref_count(block_id) == 0 or self.pool.block_hash(block_id) is not None:
                    raise ValueError(f"block {block_id} is not a held, unnamed block; commit_named names scratch blocks")
            new_ids: list[int] = []
            new_hashes: list[bytes] = []
            for block_id, block_hash in zip(block_ids, hashes, strict=True):
                if block_hash in self.index:
                    continue
                if not self.pool.admit(block_hash):
                    self.counters.add("admission_refused_blocks")
                    break
                self.index.insert(block_hash, block_id)
                self.pool.set_block_hash(block_id, block_hash)
                new_ids.append(block_id)
                new_hashes.append(block_hash)
            if self.lower is not None and new_ids and not self.lower.write_on_evict:
                index = torch.tensor(new_ids, dtype=torch.long, device=self.pool.kv.device)
                self.lower.write(new_hashes, self.pool.kv.index_select(0, index))
            self.counters.add("committed_blocks", len(new_ids))
            self.counters.add("named_committed_blocks", len(new_ids))
            return len(new_ids)

    def acquire_named(self, hashes: Sequence[bytes], num_tokens: int) -> tuple[int, ...] | None:
        """One reference to each block of the chain `hashes` (standing for `num_tokens` tokens of a prompt), or
        None, nothing taken, unless the pool holds every one of them (a hit counts `num_tokens`)."""
        if not hashes:
            raise ValueError("acquire_named needs at least one name")
        with self._lock:
            block_ids = [self.index.get(h) for h in hashes]
            missing = [i for i, b in enumerate(block_ids) if b is None]
            if missing and self.lower is None:
                return None
            held = [b for b in block_ids if b is not None]
            for block_id in held:  # first: promoting must not evict them
                self.pool.incref(block_id)
            if missing:
                loaded = self._promote_named([hashes[i] for i in missing])
                if loaded is None:
                    self.pool.free(held)
                    return None
                for i, block_id in zip(missing, loaded, strict=True):
                    block_ids[i] = block_id
                self.counters.add("named_tier_hit_blocks", len(loaded))
            self.counters.add("named_hit_tokens", num_tokens)
            return tuple(b for b in block_ids if b is not None)

    def _promote_named(self, hashes: list[bytes]) -> list[int] | None:
        """Pool blocks (held, named, indexed) holding the blocks `hashes` from the tiers below; None, nothing
        taken, unless the tiers hold them all and the pool has room."""
        assert self.lower is not None
        records = self.lower.fetch_chain(hashes)
        block_ids = self.pool.allocate_many(len(records)) if len(records) == len(hashes) else None
        if block_ids is None:
            return None
        try:
            self.lower.load(self.pool.kv, block_ids, records)
        except ValueError as exc:  # a record of another shape or dtype: never served
            self.logger.warning("named blocks not loaded from the tiers: %s", exc)
            self.pool.free(block_ids)
            return None
        for block_id, record in zip(block_ids, records, strict=True):
            if self.index.insert(record.block_hash, block_id):
                self.pool.set_block_hash(block_id, record.block_hash)
        return block_ids
