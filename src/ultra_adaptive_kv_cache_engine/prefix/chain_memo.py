"""`ChainMemo`: the block names of the last token prefixes looked up, so that a prompt is hashed once.

Admitting a request looks its prompt up twice: the scheduler counts the free blocks opening it takes
(`SequenceBlocks.blocks_to_open`), then opens it (`KVCacheManager.new_sequence`), both over the same full
blocks. A 16k-token prompt is 1,024 SHA-256 block names, a few milliseconds of host time on each lookup (a
profile of a pool hit on a 16k prefix: two chains hashed). Names are a pure function of the namespace and the
tokens (`hashing.hash_block`), so the memo can never hand out a wrong one: an entry is keyed by the exact
tokens of the blocks asked for, holds the names hashed so far (a lookup stops hashing at its first miss), and
the least recently used of `entries` is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from .hashing import hash_block
from .namespace import Namespace


class ChainMemo:
    """Chained block names of recently looked-up token prefixes (see the module docstring). Not thread-safe:
    the cache manager calls it under its lock."""

    def __init__(self, namespace: Namespace, entries: int = 16) -> None:
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
            raise ValueError(f"entries={entries!r} must be a positive int")
        self.namespace = namespace
        self.block_size = namespace.block_size
        self.entries = entries
        self._names: OrderedDict[tuple[int, ...], list[bytes]] = OrderedDict()

    def names(self, tokens: list[int], count: int) -> Iterator[bytes]:
        """The names of blocks 0 .. `count` - 1 of `tokens`, in order and lazily: those this prefix already had
        come from the memo, the others are hashed when asked for and remembered."""
        bs = self.block_size
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count * bs <= len(tokens):
            raise ValueError(f"count={count!r} must be an int from 0 to the {len(tokens) // bs} full blocks of tokens")
        key = tuple(tokens[: count * bs])
        known = self._names.pop(key, None)
        if known is None:
            known = []
            if len(self._names) >= self.entries:
                self._names.popitem(last=False)
        self._names[key] = known
        yield from known[:count]
        parent = known[-1] if known else None
        for i in range(len(known), count):
            parent = hash_block(parent, tokens[i * bs : (i + 1) * bs], self.namespace)
            known.append(parent)
            yield parent

    def __len__(self) -> int:
        return len(self._names)
