"""PrefixIndex: exact mapping, first-writer-wins inserts, longest leading run."""

from __future__ import annotations

import pytest

from ultra_adaptive_kv_cache_engine.prefix import Namespace, PrefixIndex, hash_blocks

NS = Namespace("m", "w", "t", "float16", 4, 1)


def test_insert_get_remove():
    index = PrefixIndex()
    assert index.insert(b"a", 3) is True
    assert index.insert(b"a", 5) is False  # already mapped: unchanged
    assert index.get(b"a") == 3 and index.get(b"b") is None
    assert b"a" in index and len(index) == 1 and list(index) == [b"a"]
    assert index.remove(b"a") == 3
    assert index.remove(b"a") is None
    assert len(index) == 0


def test_longest_prefix_is_the_leading_run_only():
    hashes = hash_blocks(list(range(16)), NS, 4)
    index = PrefixIndex()
    assert index.longest_prefix(hashes) == []
    index.insert(hashes[0], 7)
    index.insert(hashes[1], 2)
    index.insert(hashes[3], 9)  # present, but after a gap: not part of the prefix
    assert index.longest_prefix(hashes) == [7, 2]
    assert index.longest_prefix(hashes[:1]) == [7]
    assert index.longest_prefix([]) == []
    index.remove(hashes[0])
    assert index.longest_prefix(hashes) == []


def test_bad_input():
    index = PrefixIndex()
    with pytest.raises(ValueError, match="block_hash=''"):
        index.insert("", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_id=-1"):
        index.insert(b"a", -1)
    assert len(index) == 0
