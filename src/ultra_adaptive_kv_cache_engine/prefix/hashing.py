"""Chained block hashing: a block's name is SHA-256 of its parent's name, the namespace and its tokens.

``hash_block(parent, tokens, ns) = SHA256(parent or ROOT_PARENT || ns.digest || tokens as little-endian
int64)``. Every input has a fixed width (32 + 32 + 8 per token), so the encoding is unambiguous; the hash is
deterministic across processes and machines (no Python `hash()`), and a block's name implies its whole
prefix, so equal names mean equal KV.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from .namespace import Namespace

HASH_SIZE = 32
ROOT_PARENT = hashlib.sha256(b"uakv-block-root-v1").digest()
"""Stands in for the parent of a sequence's first block."""

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def pack_token_ids(token_ids: Sequence[int]) -> bytes:
    """`token_ids` as little-endian int64; ValueError naming the first id that is not an int64."""
    if bool in set(map(type, token_ids)):  # C-speed scan: this runs for every block of every prompt
        raise ValueError("token_ids must be integers, not booleans")
    try:
        return struct.pack(f"<{len(token_ids)}q", *token_ids)
    except (struct.error, TypeError):
        for position, token in enumerate(token_ids):
            if isinstance(token, bool) or not hasattr(token, "__index__"):
                raise ValueError(f"token_ids[{position}]={token!r} must be an integer") from None
            if not _INT64_MIN <= int(token) <= _INT64_MAX:
                raise ValueError(f"token_ids[{position}]={token!r} does not fit in int64") from None
        raise


def hash_block(parent: bytes | None, token_ids: Sequence[int], namespace: Namespace) -> bytes:
    """The 32-byte name of a block holding `token_ids` after the block named `parent` (None: first block)."""
    if parent is not None and (not isinstance(parent, bytes) or len(parent) != HASH_SIZE):
        raise ValueError(f"parent={parent!r} must be None or {HASH_SIZE} bytes")
    if not isinstance(namespace, Namespace):
        raise TypeError(f"namespace={namespace!r} must be a Namespace")
    hasher = hashlib.sha256(parent if parent is not None else ROOT_PARENT)
    hasher.update(namespace.digest)
    hasher.update(pack_token_ids(token_ids))
    return hasher.digest()


def hash_blocks(
    token_ids: Sequence[int], namespace: Namespace, block_size: int, parent: bytes | None = None
) -> list[bytes]:
    """Chained names of the FULL blocks of `token_ids` (a trailing partial block gets none).

    `block_size` must equal `namespace.block_size`; `parent` names the block before the first one.
    """
    if block_size != namespace.block_size:
        raise ValueError(f"block_size={block_size!r} does not match the namespace's block_size={namespace.block_size}")
    hashes: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], namespace)
        hashes.append(parent)
    return hashes
