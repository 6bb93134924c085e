"""Maintenance of a `SegmentDiskTier`'s log: the start-up walk that rebuilds the index, and compaction.

Both run with the tier's lock held and act on its state (index, segments, policy, counters) through the same
steps a put or remove takes. Crash safety of compaction: copies are appended and fsynced (unless the policy is
NEVER) BEFORE the old segment is unlinked, so at every moment each live block has a whole record on disk; a
crash between the two leaves two records of a block, and the walk keeps the newest (the copy), whose bytes
are the same.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..types import FsyncPolicy
from . import disk_files
from . import segment_files as seg_io
from .base import LOGGER
from .record import RecordError, parse_record
from .segment_files import EntryKind, Segment, padded

if TYPE_CHECKING:
    from .segment_disk import SegmentDiskTier


def open_log(tier: SegmentDiskTier, verify: bool) -> None:
    """Open every segment oldest first and replay it into the index; cut a torn tail off the last segment;
    start a first segment if there is none; then fit the capacity and compact if due."""
    if not os.path.isdir(tier.folder):
        os.makedirs(tier.folder, mode=0o700, exist_ok=True)
        if tier.fsync is not FsyncPolicy.NEVER:
            for folder in (os.path.dirname(tier.folder), os.path.dirname(os.path.dirname(tier.folder))):
                disk_files.fsync_dir(folder)
    ids = seg_io.list_segments(tier.folder)
    for i, seg_id in enumerate(ids):
        seg = seg_io.open_segment(tier.folder, seg_id, create=False)
        tier._segments[seg_id] = seg
        _replay(tier, seg, verify, last=i == len(ids) - 1)
    if ids:
        tier._active = tier._segments[ids[-1]]
    else:
        tier._new_segment()
    order: list[tuple[int, int, bytes]] = []
    for key, (seg_id, offset, length) in tier._index.items():
        tier._segments[seg_id].keys.add(key)
        tier._used += length
        order.append((seg_id, offset, key))
    for key, seg_id in list(tier._tomb_at.items()):
        if not _needed(tier, key, seg_id):
            tier._segments[seg_id].tombstones.discard(key)
            del tier._tomb_at[key]
    for seg in tier._segments.values():
        recount(tier, seg)
    for _, _, key in sorted(order):  # oldest first, as if they had been put in that order
        tier._policy.on_insert(key, tier._index[key][2])
    dropped = tier._make_room(0)  # the capacity may have shrunk since the records were written
    if dropped:
        LOGGER.info("%s tier: dropped %d blocks over capacity at start", tier.name, len(dropped))
    maybe_compact(tier)
    tier.counters.add("scanned", len(tier._index))


def _replay(tier: SegmentDiskTier, seg: Segment, verify: bool, last: bool) -> None:
    found = seg_io.walk(seg.fd, seg.size, tier.namespace, verify)
    for entry in found.entries:
        if entry.kind is EntryKind.FOREIGN:
            tier.counters.add("namespace_dropped")
            continue
        previous = tier._index.pop(entry.key, None)
        if previous is not None:
            tier._segments[previous[0]].dead_keys.add(entry.key)
        older_tomb = tier._tomb_at.pop(entry.key, None)
        if older_tomb is not None:
            tier._segments[older_tomb].tombstones.discard(entry.key)
        if entry.kind is EntryKind.TOMBSTONE:
            seg.tombstones.add(entry.key)
            tier._tomb_at[entry.key] = seg.id
        else:
            if previous is not None:
                tier.counters.add("duplicates_dropped")
            tier._index[entry.key] = (seg.id, entry.offset, entry.length)
    bad = found.bad_regions
    if found.bad_tail and last:  # a crash during an append: nothing after it was acknowledged
        os.ftruncate(seg.fd, found.valid_end)
        seg.size = found.valid_end
        tier.counters.add("tail_truncated")
    else:
        bad += found.bad_tail
    if bad:
        tier.counters.add("corrupt_dropped", bad)
        LOGGER.warning("%s tier: skipped %d bad region(s) in segment %s", tier.name, bad, seg.path)


def _needed(tier: SegmentDiskTier, key: bytes, tomb_seg: int, skip: int | None = None) -> bool:
    """True if a segment older than `tomb_seg` (other than `skip`) holds a dead record of `key`."""
    return any(key in s.dead_keys for s in tier._segments.values() if s.id < tomb_seg and s.id != skip)


def recount(tier: SegmentDiskTier, seg: Segment) -> None:
    """`seg.dead` from scratch: everything but its indexed records and its needed tombstones."""
    live = sum(padded(tier._index[k][2]) for k in seg.keys)
    seg.dead = seg.size - live - seg_io.TOMBSTONE_BYTES * len(seg.tombstones)


def maybe_compact(tier: SegmentDiskTier) -> None:
    """Compact each sealed segment whose dead bytes are at least `compact_dead_ratio` of its size, most dead
    first (the active segment never): reclaiming a segment copies at most (1 - ratio) of it, so the copying is
    amortised over the removals that made it dead. At most one pass over the segments per call."""
    for _ in range(len(tier._segments)):
        sealed = [s for s in tier._segments.values()
                  if s is not tier._active and s.dead and s.dead >= tier.compact_dead_ratio * s.size]
        if not sealed or not compact(tier, max(sealed, key=lambda s: (s.dead, -s.id))):
            return


def compact(tier: SegmentDiskTier, seg: Segment) -> bool:
    """Copy `seg`'s live records (verified; bad ones dropped and counted) and the tombstones still needed (an
    older segment may hold a record they remove) to the active segment, make the copies durable, then delete
    `seg`. False (and `seg` kept) if an append or fsync fails."""
    moved = 0
    try:
        for key in sorted(seg.keys, key=lambda k: tier._index[k][1]):
            _, offset, length = tier._index[key]
            data = seg_io.read_exact(seg.fd, offset, length)
            try:
                parse_record(data, key, tier.namespace)
            except RecordError as exc:
                tier._drop_bad(key, tier._index[key], exc)
                continue
            seg_id, new_offset = tier._append([data], sync=False)
            seg.keys.discard(key)
            seg.dead_keys.add(key)
            tier._index[key] = (seg_id, new_offset, length)
            tier._segments[seg_id].keys.add(key)
            moved += length
        for key in sorted(seg.tombstones):
            if _needed(tier, key, seg.id):
                tier.write_tombstone(key, sync=False)
            else:
                tier._tomb_at.pop(key, None)
        seg.tombstones.clear()
        if tier.fsync is not FsyncPolicy.NEVER:
            for seg_id in sorted(tier._unsynced_segments):
                os.fsync(tier._segments[seg_id].fd)
            tier._unsynced_segments.clear()
        os.unlink(seg.path)
        if tier.fsync is not FsyncPolicy.NEVER:
            disk_files.fsync_dir(tier.folder)
    except OSError as exc:
        tier._error(f"compaction of segment {seg.path} failed: {exc}")
        recount(tier, seg)
        return False
    del tier._segments[seg.id]
    for key in seg.dead_keys:  # tombstones that only shadowed records of `seg` are garbage now
        tomb_seg = tier._tomb_at.get(key)
        if tomb_seg is not None and not _needed(tier, key, tomb_seg):
            tier.retire_tombstone(key)
    tier._unsynced_segments.discard(seg.id)
    seg.retired = True
    seg.close_if_done()
    tier.counters.add("compactions")
    tier.counters.add("compacted_bytes", moved)
    return True
