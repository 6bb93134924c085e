"""`NamedChains`: the part of `KVCacheManager` that names and finds blocks by a chain the CALLER computed.

A pressed prompt's blocks (`compression.presses`) hold KV that is not the KV of any prefix of tokens, so they
cannot be named by `commit` (which hashes the sequence's tokens block by block). The press names them itself
(`pressed_block_hashes`: the whole prompt, the press, its budget) and hands the names here:
- `commit_named(block_ids, hashes)` names blocks the caller holds (from `allocate_scratch`) and enters them in
  the prefix index; after `free_scratch` they stay cached in the pool like any freed named block, evicted by
  the same policy;
- `acquire_named(hashes, num_tokens)` takes one reference to EVERY block of a chain (all or nothing: a part of
  a pressed chain stands for no prefix) and returns them; the caller gives them back with `free_scratch`.
Pressed chains live in the pool only: they are not written through to the tiers below, so they survive neither
an eviction from the pool nor a restart (a miss then re-prefills the prompt, its full-precision prefix reused).
Same lock, same pool and index as the rest of the manager (this is a part of its class, in a file of its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import threading

    from ..memory import BlockPool
    from ..metrics import Counters
    from ..prefix import PrefixIndex


class NamedChains:
    """Blocks named by caller-given chains (see the module docstring); mixed into `KVCacheManager`."""

    _lock: threading.RLock
    pool: BlockPool
    index: PrefixIndex
    counters: Counters

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
            new = 0
            for block_id, block_hash in zip(block_ids, hashes, strict=True):
                if block_hash in self.index:
                    continue
                if not self.pool.admit(block_hash):
                    self.counters.add("admission_refused_blocks")
                    break
                self.index.insert(block_hash, block_id)
                self.pool.set_block_hash(block_id, block_hash)
                new += 1
            self.counters.add("committed_blocks", new)
            self.counters.add("named_committed_blocks", new)
            return new

    def acquire_named(self, hashes: Sequence[bytes], num_tokens: int) -> tuple[int, ...] | None:
        """One reference to each block of the chain `hashes` (standing for `num_tokens` tokens of a prompt), or
        None, nothing taken, unless the pool holds every one of them (a hit counts `num_tokens`)."""
        if not hashes:
            raise ValueError("acquire_named needs at least one name")
        with self._lock:
            block_ids = [self.index.get(h) for h in hashes]
            if any(b is None for b in block_ids):
                return None
            found = tuple(b for b in block_ids if b is not None)
            for block_id in found:
                self.pool.incref(block_id)
            self.counters.add("named_hit_tokens", num_tokens)
            return found
