"""`PrefixIndex`: block hash -> block id, with longest-prefix match over a hash chain.

A hash table: because block hashes are chained, a run of leading hashes that are all present is a cached
prefix, so no tree is needed to match prefixes (a radix tree could sit behind the same interface).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class PrefixIndex:
    """Maps each cached block's hash to the id of the one block holding it.

    Invariant: a hash maps to at most one block. The index does not know the pool: its owner keeps the two
    consistent (the paged cache names a block only when it inserts the block's hash here, and removes the
    hash when the pool evicts the block).
    """

    def __init__(self) -> None:
        self._blocks: dict[bytes, int] = {}

    def get(self, block_hash: bytes) -> int | None:
        return self._blocks.get(block_hash)

    def insert(self, block_hash: bytes, block_id: int) -> bool:
        """Maps `block_hash` to `block_id`; False (and no change) if the hash is already mapped."""
        if not isinstance(block_hash, bytes) or not block_hash:
            raise ValueError(f"block_hash={block_hash!r} must be non-empty bytes")
        if isinstance(block_id, bool) or not isinstance(block_id, int) or block_id < 0:
            raise ValueError(f"block_id={block_id!r} must be a non-negative integer")
        if block_hash in self._blocks:
            return False
        self._blocks[block_hash] = block_id
        return True

    def remove(self, block_hash: bytes) -> int | None:
        """Forgets `block_hash`; returns the block id it mapped to, or None if it was not present."""
        return self._blocks.pop(block_hash, None)

    def longest_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Block ids of the longest run of leading `hashes` that are all present."""
        blocks: list[int] = []
        for block_hash in hashes:
            block_id = self._blocks.get(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._blocks)

    def clear(self) -> None:
        self._blocks.clear()
