"""The policy registry: strategy name -> policy class. Unknown names raise ValueError listing valid ones."""

from __future__ import annotations

from ..types import CacheStrategy
from .adaptive import AdaptivePolicy, SampledAdaptivePolicy
from .arc import ARCPolicy
from .base import Clock, EvictionPolicy
from .fifo import FIFOPolicy
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .s3fifo import S3FIFOPolicy
from .s3fifo_adaptive import AdaptiveS3FIFOPolicy
from .twoq_adaptive import TwoQAdaptivePolicy
from .twoq_freq import TwoQFrequencyPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "fifo": FIFOPolicy,
    "s3fifo": S3FIFOPolicy,
    "s3fifo_adaptive": AdaptiveS3FIFOPolicy,
    "arc": ARCPolicy,
    "twoq_adaptive": TwoQAdaptivePolicy,
    "twoq_freq": TwoQFrequencyPolicy,
    "adaptive": AdaptivePolicy,
    "adaptive_sampled": SampledAdaptivePolicy,
}
for _name in POLICIES:  # every built-in policy is a strategy a config can name (the enum is extensible)
    if _name not in CacheStrategy._value2member_map_:
        setattr(CacheStrategy, _name.upper(), _name)


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
