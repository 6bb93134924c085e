"""Eviction and admission policies behind one interface and one registry.

Registered: lru, lfu, fifo, s3fifo, s3fifo_adaptive, arc, twoq_adaptive, twoq_freq,
adaptive (the default: follows the best of twoq_adaptive, twoq_freq and LRU), adaptive_sampled (the same
with sampled shadows). The trace-replay lab (Belady's bound, synthetic
Mooncake-schema workloads) lives in the `replay` subpackage.
"""

from .adaptive import AdaptivePolicy, SampledAdaptivePolicy
from .arc import ARCPolicy
from .base import EvictionPolicy
from .fifo import FIFOPolicy
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .registry import POLICIES, has_policy, make_policy, register_policy
from .s3fifo import S3FIFOPolicy
from .s3fifo_adaptive import AdaptiveS3FIFOPolicy
from .twoq_adaptive import TwoQAdaptivePolicy
from .twoq_freq import TwoQFrequencyPolicy

__all__ = [
    "ARCPolicy", "AdaptivePolicy", "AdaptiveS3FIFOPolicy", "EvictionPolicy", "FIFOPolicy", "LFUPolicy", "LRUPolicy", "POLICIES",
    "S3FIFOPolicy", "SampledAdaptivePolicy", "TwoQAdaptivePolicy", "TwoQFrequencyPolicy", "has_policy", "make_policy", "register_policy",
]
