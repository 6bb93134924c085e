"""Eviction and admission policies behind one interface and one registry."""

from .base import EvictionPolicy
from .registry import POLICIES, has_policy, make_policy, register_policy

__all__ = ["EvictionPolicy", "POLICIES", "has_policy", "make_policy", "register_policy"]
