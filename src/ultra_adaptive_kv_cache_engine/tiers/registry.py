"""The tier registry: TierKind -> tier class, so configuration picks tiers by name, not by branches."""

from __future__ import annotations

from typing import Any

from ..types import DiskLayout, TierKind, parse_enum
from .base import Tier
from .cpu import CPUTier
from .disk import DiskTier
from .redis_tier import RedisTier
from .segment_disk import SegmentDiskTier

DISK_LAYOUTS: dict[DiskLayout, type[Tier]] = {
    DiskLayout.FILES: DiskTier,
    DiskLayout.SEGMENTS: SegmentDiskTier,
}

TIERS: dict[TierKind, type[Tier]] = {
    TierKind.CPU: CPUTier,
    TierKind.DISK: DiskTier,
    TierKind.REDIS: RedisTier,
}


def register_tier(kind: TierKind | str, cls: type[Tier]) -> None:
    """Register `cls` for `kind`; replaces an earlier registration."""
    member = parse_enum(TierKind, "tier", kind)
    if not (isinstance(cls, type) and issubclass(cls, Tier)):
        raise ValueError(f"tier {cls!r} must be a subclass of Tier")
    TIERS[member] = cls


def make_tier(kind: TierKind | str, namespace: bytes, **options: Any) -> Tier:
    """A tier of `kind` for `namespace`; `options` go to its constructor (capacity_bytes, root, url, ...).

    For the disk kind, `layout` (a `DiskLayout` or its value) picks the class from `DISK_LAYOUTS`; without it
    the class registered for the kind is built."""
    try:
        member = parse_enum(TierKind, "tier", kind)
    except ValueError:
        member = None
    cls = TIERS.get(member) if member is not None else None
    if cls is None:
        raise ValueError(f"unknown tier {kind!r}; expected one of: {', '.join(k.value for k in TIERS)}")
    layout = options.pop("layout", None)
    if layout is not None:
        if member is not TierKind.DISK:
            raise ValueError(f"layout={layout!r} applies to the disk tier only, not to tier {kind!r}")
        cls = DISK_LAYOUTS[parse_enum(DiskLayout, "disk layout", layout)]
    return cls(namespace, **options)
