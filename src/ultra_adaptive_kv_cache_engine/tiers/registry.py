"""The tier registry: TierKind -> tier class, so configuration picks tiers by name, not by branches."""

from __future__ import annotations

from typing import Any

from ..types import TierKind, parse_enum
from .base import Tier
from .cpu import CPUTier
from .disk import DiskTier
from .redis_tier import RedisTier

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
    """A tier of `kind` for `namespace`; `options` go to its constructor (capacity_bytes, root, url, ...)."""
    try:
        member = parse_enum(TierKind, "tier", kind)
    except ValueError:
        member = None
    cls = TIERS.get(member) if member is not None else None
    if cls is None:
        raise ValueError(f"unknown tier {kind!r}; expected one of: {', '.join(k.value for k in TIERS)}")
    return cls(namespace, **options)
