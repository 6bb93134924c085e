"""Victims that skip pinned keys: the one rule the block pool and the replay simulator share.

A store cannot evict a key it has pinned (a block held by a request in flight), yet the policy's order
includes it. `unpinned_victims` asks the policy for `count` victims; while fewer than `count` of them are
unpinned it asks again for twice as many, up to ``count + num_pinned`` (which holds `count` unpinned keys
whenever the policy tracks exactly the store's keys), and returns the first `count` unpinned ones in the
policy's order.

Cost: one `victims(count)` call when the policy's first victims are unpinned (the usual case for recency
policies: pinned blocks were just accessed); at worst about log2(1 + num_pinned / count) + 1 calls and
O(count + num_pinned) keys examined. `victims` may reorganise the policy (S3-FIFO's second chances, ARC's
pending victims), so a store and a simulator that must agree call this with the same arguments in the same
order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from .base import EvictionPolicy


def unpinned_victims(
    policy: EvictionPolicy, count: int, is_pinned: Callable[[Hashable], bool], num_pinned: int
) -> list[Hashable]:
    """The first `count` keys of `policy`'s eviction order for which `is_pinned` is false.

    `num_pinned` is how many tracked keys are pinned. RuntimeError if the policy cannot offer `count`
    unpinned keys (it tracks fewer keys than the store believes: an invariant of the store is broken).
    """
    if count <= 0:
        return []
    limit = count + max(num_pinned, 0)
    asked = count
    while True:
        keys = policy.victims(asked)
        chosen = [key for key in keys if not is_pinned(key)]
        if len(chosen) >= count:
            return chosen[:count]
        if len(keys) < asked or asked >= limit:
            raise RuntimeError(
                f"policy {policy.name or type(policy).__name__!r} offered {len(chosen)} unpinned victim(s) of the "
                f"{count} needed ({len(keys)} asked keys, {num_pinned} pinned); it must track every cached key"
            )
        asked = min(2 * asked, limit)
