"""twoq_adaptive whose protected queue gives keys hit there CLOCK second chances (S3-FIFO's main queue)."""

from __future__ import annotations

from collections.abc import Hashable

from .base import Clock
from .tick_order import TickList
from .twoq_adaptive import TwoQAdaptivePolicy

MAX_FREQ = 3  # S3-FIFO's two-bit counter


def freq_victims(
    probation: TickList, main: TickList, freq: dict[Hashable, int], floor: float, n: int, now: float | None = None
) -> list[Hashable]:
    """2Q's victims (see `twoq_victims`) where a key at main's head with a counter > 0 spends one and moves
    to main's newest end instead (after the walk, at tick `now`, or main's clock when None); spared keys are
    taken in order if main runs out."""
    if n == 1 and (len(probation) or len(main)):  # the common ask: no walk when the head is the victim
        if len(probation) and (probation.total >= floor or not len(main)):
            return [probation.first()]
        head = main.first()
        if not freq.get(head):
            return [head]
    out: list[Hashable] = []
    spared: list[tuple[Hashable, int]] = []
    p_items, m_items = probation.items(), main.items()
    p_total = probation.total
    p_left, m_left = len(probation), len(main)
    while len(out) < n and (p_left or m_left):
        if p_left and (p_total >= floor or not m_left):
            key, size = next(p_items)
            p_total -= size
            p_left -= 1
            out.append(key)
            continue
        key, size = next(m_items)
        m_left -= 1
        count = freq.get(key)
        if count:
            freq[key] = count - 1
            spared.append((key, size))
        else:
            out.append(key)
    out.extend(key for key, _ in spared[: n - len(out)])
    for key, size in spared:
        main.pop(key)
        if now is None:
            main.touch(key, size)
        else:
            main.touch_at(key, size, now)
    return out


class TwoQFrequencyPolicy(TwoQAdaptivePolicy):
    """`TwoQAdaptivePolicy` with a hit counter per protected key, capped at 3, spent at M's eviction edge.

    - a hit on a key in M (or an insert of it) adds one to its counter; a key promoted from P, or admitted
      from a ghost, starts at 0;
    - victims: P exactly as twoq_adaptive; from M, a key at the head with a counter > 0 is not a victim: its
      counter drops by one and it moves to M's newest end (the current tick) once the walk is over; if the
      walk runs out of M before `n` victims, the keys it spared are taken in order after all.
    So frequently hit prefixes (shared system prompts, popular documents) outlive M's recency order, which is
    what S3-FIFO's frequency buys on Zipf-popular prompts. `victims` changes counters and M's order (the
    policy's own bookkeeping), never which keys are tracked. O(1) amortised per event: each second chance
    spends a hit.
    """

    name = "twoq_freq"

    def __init__(self, capacity: int | None = None, clock: Clock | None = None) -> None:
        super().__init__(capacity, clock)
        self._freq: dict[Hashable, int] = {}

    def _touch(self, key: Hashable, size: int) -> None:
        if self._probation.pop(key) is None:
            freq = self._freq.get(key, 0)
            if freq < MAX_FREQ:
                self._freq[key] = freq + 1
        self._main.touch(key, size)

    def _forget(self, key: Hashable) -> None:
        self._freq.pop(key, None)

    def victims(self, n: int) -> list[Hashable]:
        return freq_victims(self._probation, self._main, self._freq, self.share * self.target_capacity, n)
