"""`BlockPool`: the preallocated paged KV tensor and the bookkeeping of its blocks.

Ownership: a block is either held (ref count >= 1, owned by the sequences that hold it) or free (ref count
0). A free block may still hold a hash: its content is cached and a prefix hit revives it (`incref`), until
`allocate` hands it out again, which evicts the hash (reported through `on_evict` or `take_evicted`). A held
block is never evicted. Freed blocks without a hash are reused first (nothing is lost), a sequence's blocks
in reverse order.

Who is evicted among the free blocks that hold a hash:
- without a policy, the free queue is the eviction order: freed blocks with a hash go to its tail, so the
  queue is LRU of free time, a sequence's tail evicted before its prefix;
- with a policy (`EvictionPolicy`, sizes of 1 block), the free queue holds only unnamed blocks, and when none
  is left the policy names the victims among the free named blocks (`CachedBlockEvictor`). The pool drives
  it by itself: `set_block_hash` is on_insert, `incref` of a named block is on_access (a hit or a share),
  a hash leaving its block (`clear_block_hash`, eviction) is on_remove; `admit` forwards to its admit.
  A hash names at most one block.

Bookkeeping is plain Python (no torch) except the backing tensor `kv`; every operation is O(1) per block,
plus the policy's own cost per event, and an allocation that evicts k blocks with p named blocks held costs
O(k) victims in the usual case, O(k + p) at worst (see `policies.pinned`). The pool is not thread-safe: its
owner serialises calls.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..policies.base import EvictionPolicy
from .allocator import MemoryAllocator, TorchAllocator, check_allocation
from .cached_blocks import CachedBlockEvictor
from .free_queue import FreeBlockQueue
from .kv_spec import KVSpec


class OutOfBlocksError(RuntimeError):
    """Raised by owners of a pool when a request needs more free blocks than the pool has."""


@dataclass(frozen=True, slots=True)
class EvictedBlock:
    """A cached block whose slot was reallocated: `block_hash` no longer names `block_id`'s content."""

    block_id: int
    block_hash: bytes


EvictCallback = Callable[[EvictedBlock], None]


class BlockPool:
    """`num_blocks` blocks of `spec` in one tensor `kv` of shape ``spec.pool_shape(num_blocks)``.

    `allocator` is any object with ``allocate(size) -> Tensor`` and ``deallocate(tensor)`` (default:
    `TorchAllocator(spec.storage_dtype, spec.device)`); what it returns must match the spec's storage dtype
    (uint8 for a quantized pool, else its dtype) and device and have exactly ``num_blocks *
    spec.elements_per_block`` elements. `on_evict`, if given, is called for each
    evicted cached block; otherwise evictions wait in a list drained by `take_evicted()`. `policy`, if
    given (a new instance, tracking nothing), decides which cached free block is evicted (see the module).
    """

    def __init__(
        self,
        spec: KVSpec,
        num_blocks: int,
        allocator: MemoryAllocator | None = None,
        on_evict: EvictCallback | None = None,
        policy: EvictionPolicy | None = None,
    ) -> None:
        if not isinstance(spec, KVSpec):
            raise TypeError(f"spec={spec!r} must be a KVSpec")
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be a positive integer")
        if allocator is None:
            allocator = TorchAllocator(spec.storage_dtype, spec.device)
        if not (callable(getattr(allocator, "allocate", None)) and callable(getattr(allocator, "deallocate", None))):
            raise TypeError(f"allocator={allocator!r} must have allocate(size) and deallocate(tensor) methods")
        self._ref = [0] * num_blocks
        self._cached = CachedBlockEvictor(policy, self._ref) if policy is not None else None
        self.spec = spec
        self.num_blocks = num_blocks
        self._allocator = allocator
        size = num_blocks * spec.elements_per_block
        self._backing: torch.Tensor | None = check_allocation(allocator.allocate(size), size, spec.storage_dtype,
                                                              spec.device, allocator)
        self.kv: torch.Tensor = self._backing.view(spec.pool_shape(num_blocks))
        self._hash: list[bytes | None] = [None] * num_blocks
        self._free = FreeBlockQueue(num_blocks)  # with a policy: only the free blocks without a hash
        self._on_evict = on_evict
        self._evicted: list[EvictedBlock] = []
        self.num_evictions = 0

    @property
    def policy(self) -> EvictionPolicy | None:
        """The policy that orders the cached free blocks for eviction; None: the free queue does."""
        return self._cached.policy if self._cached is not None else None

    # -- allocation -------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks with ref count 0 (cached or not): how many `allocate` can hand out now."""
        return len(self._free) if self._cached is None else len(self._free) + self._cached.num_idle

    def allocate(self) -> int | None:
        """One free block with ref count 1, evicting its hash if it had one; None if none is free.

        Without a policy the head of the free queue; with one an unnamed free block, else the policy's victim.
        """
        if self._cached is not None:
            blocks = self.allocate_many(1)
            return blocks[0] if blocks else None
        block_id = self._free.popleft()
        if block_id is None:
            return None
        self._ref[block_id] = 1
        old_hash = self._hash[block_id]
        if old_hash is not None:
            self._hash[block_id] = None
            self._report_eviction(EvictedBlock(block_id, old_hash))
        return block_id

    def allocate_many(self, n: int) -> list[int] | None:
        """`n` blocks, or None (and nothing changed) if fewer than `n` are free.

        Without a policy the first `n` of the free queue. With one, the unnamed free blocks first (queue
        order), then the policy's victims among the free named blocks, asked for once for all that remain.
        """
        if type(n) is not int or n < 0:
            raise ValueError(f"n={n!r} must be a non-negative integer")
        if n > self.num_free:
            return None
        unnamed = n if self._cached is None else min(n, len(self._free))
        victims = [] if self._cached is None else self._cached.evict(n - unnamed)  # first: it may raise
        blocks = self._free.popleft_many(unnamed)
        assert blocks is not None  # unnamed <= len(self._free)
        blocks.extend(block_id for block_id, _ in victims)
        ref, hashes = self._ref, self._hash
        for block_id in blocks:
            ref[block_id] = 1
            old_hash = hashes[block_id]
            if old_hash is not None:
                hashes[block_id] = None
                self._report_eviction(EvictedBlock(block_id, old_hash))
        return blocks

    def admit(self, block_hash: bytes) -> bool:
        """Whether the policy would cache `block_hash` (its `admit(hash, 1)`); True without a policy.

        Asked by the owner before naming a block; the pool does not enforce the answer."""
        return True if self._cached is None else self._cached.admit(block_hash)

    def incref(self, block_id: int) -> None:
        """One more holder of `block_id`. Reviving a free block requires it to hold a hash (a prefix hit).

        With a policy, incref of a named block (a hit or a share) is its on_access."""
        self._check_id(block_id)
        block_hash = self._hash[block_id]
        if self._ref[block_id] == 0:
            if block_hash is None:
                raise ValueError(f"block {block_id} is free and holds no cached content; allocate() it instead")
            if self._cached is None:
                self._free.remove(block_id)
            else:
                self._cached.revive(block_id)
        self._ref[block_id] += 1
        if self._cached is not None and block_hash is not None:
            self._cached.access(block_hash)

    def free(self, block_ids: Sequence[int]) -> None:
        """Drops one reference to each of `block_ids`, last first; blocks reaching 0 join the free queue.

        If any id is invalid or would drop below 0, ValueError and nothing changes.
        """
        ref, num_blocks = self._ref, self.num_blocks
        zeros: list[int] = []
        done = 0
        for block_id in reversed(block_ids):
            if type(block_id) is not int or not 0 <= block_id < num_blocks or ref[block_id] == 0:
                self._undo_free(block_ids, done)
                self._raise_bad_free(block_ids)
            ref[block_id] -= 1
            done += 1
            if ref[block_id] == 0:
                zeros.append(block_id)
        queue, hashes, cached = self._free, self._hash, self._cached
        for block_id in zeros:
            if hashes[block_id] is None:
                queue.appendleft(block_id)
            elif cached is None:
                queue.append(block_id)
            else:
                cached.release(block_id)

    def _undo_free(self, block_ids: Sequence[int], done: int) -> None:
        for block_id in list(reversed(block_ids))[:done]:
            self._ref[block_id] += 1

    def _raise_bad_free(self, block_ids: Sequence[int]) -> None:
        for block_id, count in Counter(block_ids).items():
            self._check_id(block_id)
            if self._ref[block_id] < count:
                raise ValueError(
                    f"block {block_id} has ref count {self._ref[block_id]}; cannot drop {count} reference(s)"
                )
        raise AssertionError("unreachable: free() failed on valid ids")  # pragma: no cover

    def decref(self, block_id: int) -> None:
        """`free([block_id])`."""
        self.free([block_id])

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref[block_id]

    def free_block_ids(self) -> list[int]:
        """Free blocks in eviction order (head first). With a policy: the unnamed ones in reuse order, then the
        cached ones in the order they were freed (which of them leaves first is the policy's choice)."""
        if self._cached is None:
            return list(self._free)
        return [*self._free, *self._cached.idle_block_ids()]

    # -- content names -------------------------------------------------------------------------------------
    def block_hash(self, block_id: int) -> bytes | None:
        self._check_id(block_id)
        return self._hash[block_id]

    def set_block_hash(self, block_id: int, block_hash: bytes) -> None:
        """Names the content of a held block. A block keeps one name until it is cleared or evicted.

        With a policy: on_insert(hash, 1), and a hash that already names another block is refused."""
        self._check_id(block_id)
        if not isinstance(block_hash, bytes) or not block_hash:
            raise ValueError(f"block_hash={block_hash!r} must be non-empty bytes")
        if self._ref[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only a held block can be given a hash")
        current = self._hash[block_id]
        if current is not None and current != block_hash:
            raise ValueError(f"block {block_id} already holds hash {current.hex()[:16]}...; clear it first")
        if current is None and self._cached is not None:
            self._cached.name(block_id, block_hash)
        self._hash[block_id] = block_hash

    def clear_block_hash(self, block_id: int) -> bytes | None:
        """Forgets the name of `block_id` (returned; with a policy its on_remove); a free block moves to the head
        of the free queue."""
        self._check_id(block_id)
        old_hash = self._hash[block_id]
        if old_hash is None:
            return None
        self._hash[block_id] = None
        idle = self._ref[block_id] == 0
        if self._cached is not None:
            self._cached.unname(old_hash)
        elif idle:
            self._free.remove(block_id)
        if idle:
            self._free.appendleft(block_id)
        return old_hash

    def num_cached(self) -> int:
        """Blocks that hold a hash (held or free). O(num_blocks)."""
        return sum(h is not None for h in self._hash)

    def take_evicted(self) -> list[EvictedBlock]:
        """Evictions not yet taken, oldest first (always empty when an `on_evict` callback is set)."""
        evicted, self._evicted = self._evicted, []
        return evicted

    # -- data -----------------------------------------------------------------------------------------------
    def block(self, block_id: int) -> torch.Tensor:
        """View of one block's KV, shape ``spec.block_shape``."""
        self._check_id(block_id)
        return self.kv[block_id]

    def copy_block(self, src: int, dst: int) -> None:
        """Copies `src`'s KV into `dst`, which must be held only once and hold no hash (copy-on-write)."""
        self._check_id(src)
        self._check_id(dst)
        if self._ref[dst] != 1 or self._hash[dst] is not None:
            raise ValueError(f"block {dst} must be exclusively held and unnamed to be written")
        self.kv[dst].copy_(self.kv[src])

    def close(self) -> None:
        """Hands the backing tensor back to the allocator; the pool is unusable afterwards."""
        backing, self._backing = self._backing, None
        if backing is not None:
            self.kv = torch.empty(0, dtype=self.spec.storage_dtype)
            self._allocator.deallocate(backing)

    def _report_eviction(self, evicted: EvictedBlock) -> None:
        self.num_evictions += 1
        if self._on_evict is not None:
            self._on_evict(evicted)
        else:
            self._evicted.append(evicted)

    def _check_id(self, block_id: object) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is out of range; expected an int in [0, {self.num_blocks})")

    def __repr__(self) -> str:
        return f"BlockPool(num_blocks={self.num_blocks}, free={self.num_free}, spec={self.spec})"
