"""Segment files of the log-structured disk tier: append, positional read, and the start-up walk.

Layout: `<root>/<namespace hex>/segments/<id as 16 hex>.seg`, ids increasing with age. A segment is a sequence of
records (`record.py`, version 2), each starting at a multiple of ALIGN (64) bytes (zero padding after a record),
so every payload is 64-byte aligned in the file and a walk can find the next record after bad bytes by trying
aligned offsets only. A TOMBSTONE is a record with an empty payload and the JSON header TOMBSTONE_JSON: it says
"the block named by this record's hash was removed" for every older record of that block.

Invariants: records are appended whole at the end of a segment (one `writev`), never changed in place; a failed
append is cut off again (`ftruncate`), so a segment is only ever a run of whole records plus, after a crash, a
torn tail, which the walk reports (`SegmentWalk.valid_end`) for the tier to cut off.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from .record import (
    CHECKSUM_BYTES,
    MAGIC,
    PREFIX_BYTES,
    RecordError,
    checksum_of,
    parse_prefix,
    record_head,
)

ALIGN = 64
SUFFIX = ".seg"
_NAME = re.compile(r"^[0-9a-f]{16}\.seg$")
TOMBSTONE_JSON = b'{"tombstone":true}'
TOMBSTONE_BYTES = -(-(PREFIX_BYTES + len(TOMBSTONE_JSON) + CHECKSUM_BYTES) // 64) * 64
"""Padded size of a tombstone in a segment."""
_PAD = bytes(ALIGN)
_WINDOW = 1 << 20


def padded(length: int) -> int:
    """`length` rounded up to ALIGN: the bytes a record of `length` takes in a segment."""
    return -(-length // ALIGN) * ALIGN


def tombstone(block_hash: bytes, namespace: bytes) -> bytes:
    """The serialised tombstone record of `block_hash` (prefix, JSON header, no payload, checksum)."""
    head = record_head(block_hash, namespace, TOMBSTONE_JSON, 0)
    return head + checksum_of(head)


class EntryKind(Enum):
    RECORD = "record"
    TOMBSTONE = "tombstone"
    FOREIGN = "foreign"  # a sound-looking record of another namespace


@dataclass(frozen=True)
class WalkEntry:
    """One record found by a walk: where it starts, its block hash, its serialised length (unpadded)."""

    offset: int
    key: bytes
    length: int
    kind: EntryKind


@dataclass
class SegmentWalk:
    """What a walk of one segment found: the entries in order, the number of bad regions skipped between
    them (the tail not included), where the last whole entry ends (padded), and whether bytes follow it (a torn
    or bad tail: `bad_tail`)."""

    entries: list[WalkEntry] = field(default_factory=list)
    bad_regions: int = 0
    valid_end: int = 0
    bad_tail: bool = False


@dataclass
class Segment:
    """One open segment: its id, path and descriptor, its end (`size`), the bytes of its records that are no
    longer served (`dead`), the served keys whose records it holds, the NEEDED tombstones it holds (a tombstone
is needed while an older segment holds a dead record of its key: those keys are `dead_keys`; needed tombstones
do not count as dead), and readers in flight (closed only when none is left)."""

    id: int
    path: str
    fd: int
    size: int = 0
    dead: int = 0
    keys: set[bytes] = field(default_factory=set)
    tombstones: set[bytes] = field(default_factory=set)
    dead_keys: set[bytes] = field(default_factory=set)
    readers: int = 0
    retired: bool = False

    def close_if_done(self) -> None:
        """Close the descriptor once the segment is retired and no reader is in it (caller holds the lock)."""
        if self.retired and self.readers == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def segment_path(folder: str, seg_id: int) -> str:
    return f"{folder}/{seg_id:016x}{SUFFIX}"


def list_segments(folder: str) -> list[int]:
    """Ids of the segment files in `folder`, oldest first (other names are ignored)."""
    if not os.path.isdir(folder):
        return []
    return sorted(int(name[:16], 16) for name in os.listdir(folder) if _NAME.match(name))


def open_segment(folder: str, seg_id: int, create: bool) -> Segment:
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    path = segment_path(folder, seg_id)
    fd = os.open(path, flags, 0o600)
    return Segment(seg_id, path, fd, os.fstat(fd).st_size)


def append(seg: Segment, chunks: Sequence[bytes | memoryview]) -> int:
    """Write `chunks` (one record) at the end of `seg` plus zero padding to ALIGN; return its offset.

    One `pwritev` per call (more only if the kernel writes short). On failure the segment is cut back to its old
    end (what a failed append wrote is never left behind) and the error re-raised.
    """
    offset = seg.size
    views = [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]
    length = sum(v.nbytes for v in views)
    pad = padded(length) - length
    if pad:
        views.append(memoryview(_PAD)[:pad])
    pos = offset
    try:
        while views:
            written = os.pwritev(seg.fd, views, pos)
            if written <= 0:
                raise OSError(errno.EIO, f"pwritev wrote {written} bytes")
            pos += written
            while views and written >= views[0].nbytes:
                written -= views[0].nbytes
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]
    except BaseException:
        try:
            os.ftruncate(seg.fd, offset)
        except OSError:
            pass
        raise
    seg.size = offset + length + pad
    return offset


def read_record_into(fd: int, offset: int, head: bytes, out: memoryview) -> bool:
    """ONE `preadv` at `offset`: the record's head into a small buffer, its payload straight into `out`, its
    checksum; True if the head is exactly `head` and the checksum matches (verified over `out` in place).
    False for anything else (the caller takes the ordinary path, which classifies and counts); `out` may then
    have been overwritten. OSError from the file system."""
    got_head = bytearray(len(head))
    tail = bytearray(CHECKSUM_BYTES)
    got = os.preadv(fd, (got_head, out, tail), offset)
    return (
        got == len(head) + out.nbytes + CHECKSUM_BYTES
        and got_head == head
        and checksum_of(head, out) == tail
    )


def read_exact(fd: int, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (fewer only at the end of the file)."""
    data = os.pread(fd, length, offset)
    while len(data) < length:
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            break
        data += more
    return data


def walk(fd: int, size: int, namespace: bytes, verify: bool) -> SegmentWalk:
    """Every record in a segment of `size` bytes, in order. A record whose prefix is bad, that runs past the end,
    or (with `verify`, and always for tombstones) whose checksum fails, starts a bad region: the walk goes on at
    the next aligned offset that holds a record's magic."""
    result = SegmentWalk()
    pos, in_bad = 0, False
    while pos + PREFIX_BYTES <= size:
        entry = _entry_at(fd, pos, size, namespace, verify)
        if entry is None:
            result.bad_regions += not in_bad
            in_bad = True
            pos = _next_magic(fd, pos + ALIGN, size)
            continue
        in_bad = False
        result.entries.append(entry)
        pos = entry.offset + padded(entry.length)
        result.valid_end = pos
    if in_bad:  # the last bad region runs to the end: it is the tail, reported apart
        result.bad_regions -= 1
    result.bad_tail = size > result.valid_end
    return result


def _entry_at(fd: int, pos: int, size: int, namespace: bytes, verify: bool) -> WalkEntry | None:
    try:
        prefix = parse_prefix(read_exact(fd, pos, PREFIX_BYTES))
    except RecordError:
        return None
    length = prefix.total_len
    if pos + length > size:
        return None
    is_tomb = prefix.payload_len == 0 and prefix.header_len == len(TOMBSTONE_JSON)
    if is_tomb or verify:
        data = read_exact(fd, pos, length)
        body = length - CHECKSUM_BYTES
        if checksum_of(data[:body]) != data[body:]:
            return None
        is_tomb = is_tomb and data[PREFIX_BYTES:body] == TOMBSTONE_JSON
    if prefix.namespace != namespace:
        kind = EntryKind.FOREIGN
    else:
        kind = EntryKind.TOMBSTONE if is_tomb else EntryKind.RECORD
    return WalkEntry(pos, prefix.block_hash, length, kind)


def _next_magic(fd: int, start: int, size: int) -> int:
    """The first aligned offset >= `start` where MAGIC is, or `size` if none."""
    pos = padded(start)
    while pos < size:
        window = read_exact(fd, pos, min(_WINDOW + len(MAGIC), size - pos))
        found = window.find(MAGIC)
        while found >= 0 and found % ALIGN:
            found = window.find(MAGIC, found + 1)
        if found >= 0:
            return pos + found
        pos += _WINDOW
    return size
