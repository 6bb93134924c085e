"""prefix layer (L1): namespaces, chained block hashing and the index from block hash to block id."""

from __future__ import annotations

from .hashing import HASH_SIZE, ROOT_PARENT, hash_block, hash_blocks, pack_token_ids
from .index import PrefixIndex
from .namespace import NAMESPACE_FORMAT, Namespace

__all__ = [
    "HASH_SIZE",
    "NAMESPACE_FORMAT",
    "ROOT_PARENT",
    "Namespace",
    "PrefixIndex",
    "hash_block",
    "hash_blocks",
    "pack_token_ids",
]
