"""Count the KV blocks a persistence folder holds, without the model and without changing anything on disk.

`engine.load()` reports this before the model session opens; the session's disk tier verifies the blocks (and
drops bad ones) only when it opens the folder, on the first `process` request.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..tiers import segment_files
from ..tiers.disk_files import SUFFIX
from ..tiers.segment_files import EntryKind

_NAMESPACE = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"^[0-9a-f]{2}$")
_BLOCK = re.compile(rf"^[0-9a-f]{{64}}{re.escape(SUFFIX)}$")


def count_kv_blocks(root: str | os.PathLike[str]) -> int:
    """KV blocks under `root`, in every namespace folder `<root>/<namespace hex>/` (every model and tenant) and
    both disk layouts: one file per block, and segment logs (records not removed by a later tombstone).
    Unverified: a bad block counts until the disk tier opens the folder and drops it."""
    root = Path(root)
    if not root.is_dir():
        return 0
    total = 0
    for entry in os.scandir(root):
        if entry.is_dir(follow_symlinks=False) and _NAMESPACE.match(entry.name):
            total += _count_files(Path(entry.path)) + _count_segments(Path(entry.path), bytes.fromhex(entry.name))
    return total


def _count_files(folder: Path) -> int:
    count = 0
    for shard in os.scandir(folder):
        if shard.is_dir(follow_symlinks=False) and _SHARD.match(shard.name):
            count += sum(1 for f in os.scandir(shard.path) if _BLOCK.match(f.name))
    return count


def _count_segments(folder: Path, namespace: bytes) -> int:
    segments = os.fspath(folder / "segments")
    live: set[bytes] = set()
    for seg_id in segment_files.list_segments(segments):
        try:
            fd = os.open(segment_files.segment_path(segments, seg_id), os.O_RDONLY)
        except FileNotFoundError:  # compacted away by a live tier since the listing
            continue
        try:
            walk = segment_files.walk(fd, os.fstat(fd).st_size, namespace, verify=False)
        finally:
            os.close(fd)
        for found in walk.entries:
            if found.kind is EntryKind.RECORD:
                live.add(found.key)
            elif found.kind is EntryKind.TOMBSTONE:
                live.discard(found.key)
    return len(live)
