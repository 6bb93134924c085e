"""`CachedBlockEvictor`: the named blocks of a `BlockPool` and the eviction policy that orders them.

With a policy, the pool keeps only its unnamed free blocks in its `FreeBlockQueue` (reused first: nothing
cached is lost); the named blocks (those holding a content hash, held or free) are known here, keyed by
hash, and the policy decides which free one is evicted when no unnamed block is left.

Invariants:
- the policy tracks exactly the hashes in `_block_of`, and a hash names at most one block;
- `_idle` holds the named blocks whose ref count (in the pool's `ref_counts`) is 0, in the order they were
  freed: the only blocks `evict` hands back; a named block with ref count >= 1 is pinned;
- the pool reports every event, and the policy hears: `name` -> on_insert(hash, 1), `access` -> on_access,
  `unname` and `evict` -> on_remove; `release` / `revive` (a named block's ref count reaches / leaves 0) only
  move it in or out of `_idle`: a free cached block is still cached.
Cost: O(1) per event plus the policy's; `evict(k)` as `policies.pinned.unpinned_victims`. Torch-free.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..policies.base import EvictionPolicy
from ..policies.pinned import unpinned_victims


class CachedBlockEvictor:
    """Named blocks of one pool, ordered for eviction by `policy` (sizes are 1: capacity is in blocks).

    `ref_counts` is the pool's list of ref counts by block id, read here and never written.
    """

    __slots__ = ("_block_of", "_idle", "_refs", "policy")

    def __init__(self, policy: EvictionPolicy, ref_counts: Sequence[int]) -> None:
        if not isinstance(policy, EvictionPolicy):
            raise TypeError(f"policy={policy!r} must be an EvictionPolicy")
        if len(policy):
            raise ValueError(f"policy {policy.name!r} already tracks {len(policy)} key(s); a pool needs a new one")
        self.policy = policy
        self._refs = ref_counts
        self._block_of: dict[bytes, int] = {}
        self._idle: dict[int, None] = {}

    @property
    def num_idle(self) -> int:
        """Named blocks with ref count 0."""
        return len(self._idle)

    def __len__(self) -> int:
        return len(self._block_of)

    def name(self, block_id: int, block_hash: bytes) -> None:
        """A held block gets `block_hash`. ValueError (nothing changed) if the hash names another block."""
        other = self._block_of.get(block_hash)
        if other is not None:
            raise ValueError(f"hash {block_hash.hex()[:16]}... already names block {other}; one hash, one block")
        self._block_of[block_hash] = block_id
        self.policy.on_insert(block_hash, 1)

    def unname(self, block_hash: bytes) -> None:
        """`block_hash` leaves its block (held or free)."""
        self._idle.pop(self._block_of.pop(block_hash), None)
        self.policy.on_remove(block_hash)

    def access(self, block_hash: bytes) -> None:
        """The named block is reused (a prefix hit) or shared (a fork)."""
        self.policy.on_access(block_hash)

    def release(self, block_id: int) -> None:
        """A named block's ref count reached 0."""
        self._idle[block_id] = None

    def revive(self, block_id: int) -> None:
        """A named block's ref count left 0."""
        del self._idle[block_id]

    def admit(self, block_hash: bytes) -> bool:
        return bool(self.policy.admit(block_hash, 1))

    def evict(self, count: int) -> list[tuple[int, bytes]]:
        """(block id, hash) of `count` idle named blocks in the policy's order, their hashes forgotten here and
        removed from the policy; the caller clears them in the pool. Requires ``count <= num_idle``."""
        if count <= 0:
            return []
        if count > self.num_idle:
            raise ValueError(f"count={count} exceeds the {self.num_idle} idle cached block(s)")
        block_of, refs = self._block_of, self._refs

        def pinned(key: Hashable) -> bool:
            block_id = block_of.get(key)  # type: ignore[call-overload]
            if block_id is None:
                raise RuntimeError(f"policy {self.policy.name!r} offered {key!r}, which names no block")
            return refs[block_id] > 0

        keys = unpinned_victims(self.policy, count, pinned, len(block_of) - self.num_idle)
        out: list[tuple[int, bytes]] = []
        for key in keys:
            block_id = block_of.pop(key)  # type: ignore[call-overload]
            del self._idle[block_id]
            out.append((block_id, key))  # type: ignore[arg-type]
            self.policy.on_remove(key)
        return out

    def idle_block_ids(self) -> list[int]:
        """Named blocks with ref count 0, in the order they were freed (which one leaves first is the policy's
        choice). O(idle blocks)."""
        return list(self._idle)
