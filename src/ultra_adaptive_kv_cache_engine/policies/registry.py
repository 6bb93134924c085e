"""The policy registry: strategy name -> policy class. Unknown names raise ValueError listing valid ones."""

from __future__ import annotations

from .base import Clock, EvictionPolicy
from .lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
}


def register_policy(name: str, cls: type[EvictionPolicy]) -> None:
    """Register `cls` under `name` (lower-case); re-registering a name replaces it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name {name!r} must be a non-empty string")
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise ValueError(f"policy {cls!r} must be a subclass of EvictionPolicy")
    POLICIES[name.lower()] = cls


def has_policy(name: str) -> bool:
    return str(name).lower() in POLICIES


def make_policy(name: str, capacity: int | None = None, clock: Clock | None = None) -> EvictionPolicy:
    """A new policy instance for `name`."""
    cls = POLICIES.get(str(name).lower())
    if cls is None:
        raise ValueError(f"unknown eviction policy {name!r}; expected one of: {', '.join(sorted(POLICIES))}")
    return cls(capacity, clock)
