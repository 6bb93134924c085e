"""Where blocks live: CPU memory, disk, Redis/Valkey; a tiered store composing them; one async wrapper."""

from .base import FlushResult, PutResult, Tier, TierUsage
from .block_io import load_blocks, load_records, records_to_host
from .cpu import CPUTier
from .disk import DiskTier
from .record import (
    BlockRecord,
    CorruptBlockError,
    NamespaceMismatchError,
    RecordError,
    UnsupportedFormatError,
    adopt_block,
    borrow_block,
    encode_block,
    parse_record,
    seal,
)
from .redis_tier import RedisTier
from .registry import DISK_LAYOUTS, TIERS, DiskLayout, make_tier, register_tier
from .segment_disk import SegmentDiskTier
from .store import TieredStore
from .transfer import AsyncTransfer

__all__ = [
    "DISK_LAYOUTS", "TIERS", "AsyncTransfer", "BlockRecord", "CPUTier", "CorruptBlockError", "DiskLayout",
    "DiskTier", "FlushResult", "SegmentDiskTier",
    "NamespaceMismatchError", "PutResult", "RecordError", "RedisTier", "Tier", "TierUsage", "TieredStore",
    "UnsupportedFormatError", "adopt_block", "borrow_block", "encode_block", "load_blocks", "load_records", "make_tier", "parse_record",
    "records_to_host", "register_tier", "seal",
]  # fmt: skip
