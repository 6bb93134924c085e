"""`CachePrefetcher`: promotes to the fast tier the blocks of the conversations expected to come back next.

A live conversation's next turn starts with its previous turn (same prefix chain), so the blocks worth having
in the fast tier are those of the conversations whose next turn is due. The prefetcher learns the gap between
turns (an EWMA per conversation, the EWMA over all conversations until it has one of its own), ranks live
conversations by their expected next arrival, and, on each `step()`, promotes through a `BlockSource` the
blocks (in prefix order, up to the first block no tier holds: later ones lack a parent) of those due
within `lookahead_s`, at most `max_blocks` per step. A conversation
overdue by more than its own gap is presumed idle and no longer prefetched (until its next turn).

Invariants: a conversation is live from its last turn until `live_timeout_s` later or `end()`; blocks
already in the fast tier are never promoted again; the clock is injected. Thread-safe: requests may report
turns while another thread runs `step()` (promotion itself runs outside the lock).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..cache.tier_controls import BlockSource
from ..policies.base import Clock


@dataclass
class _Conversation:
    keys: tuple[bytes, ...]
    last_seen: float
    mean_gap: float | None = None
    turns: int = 1


@dataclass(frozen=True)
class PrefetchCandidate:
    """A live conversation and when its next turn is expected (clock seconds)."""

    conversation_id: str
    expected_at: float
    gap_s: float
    blocks: int


@dataclass(frozen=True)
class PrefetchResult:
    """What one `step` did: blocks planned (not yet in the fast tier), promoted, and for which conversations."""

    planned: int
    promoted: int
    conversations: tuple[str, ...]


class CachePrefetcher:
    """See the module docstring. `gap_alpha` weighs the newest gap in the EWMAs; `default_gap_s` is used
    before any gap was seen."""

    def __init__(
        self,
        source: BlockSource,
        fast_tier: str,
        clock: Clock | None = None,
        lookahead_s: float = 5.0,
        max_blocks: int = 256,
        live_timeout_s: float = 600.0,
        gap_alpha: float = 0.3,
        default_gap_s: float = 30.0,
    ) -> None:
        for name, value in (("lookahead_s", lookahead_s), ("live_timeout_s", live_timeout_s),
                            ("default_gap_s", default_gap_s)):  # fmt: skip
            if not value >= 0:
                raise ValueError(f"{name}={value!r} must be a non-negative number of seconds")
        if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks!r} must be a positive integer")
        if not 0.0 < gap_alpha <= 1.0:
            raise ValueError(f"gap_alpha={gap_alpha!r} must be in (0, 1]")
        self.source = source
        self.fast_tier = fast_tier
        self.clock = clock or time.monotonic
        self.lookahead_s = lookahead_s
        self.max_blocks = max_blocks
        self.live_timeout_s = live_timeout_s
        self.gap_alpha = gap_alpha
        self.global_gap: float | None = None
        self.default_gap_s = default_gap_s
        self._live: dict[str, _Conversation] = {}
        self.promoted_total = 0
        self._lock = threading.RLock()

    def on_request(self, conversation_id: str, keys: Sequence[bytes]) -> None:
        """A turn of `conversation_id` arrived; `keys` are the blocks its next turn will start with."""
        if not isinstance(conversation_id, str) or not conversation_id:
            raise ValueError(f"conversation_id={conversation_id!r} must be a non-empty string")
        with self._lock:
            now = self.clock()
            conversation = self._live.get(conversation_id)
            if conversation is None or now - conversation.last_seen > self.live_timeout_s:
                self._live[conversation_id] = _Conversation(tuple(keys), now)
                return
            gap = now - conversation.last_seen
            conversation.mean_gap = self._ewma(conversation.mean_gap, gap)
            self.global_gap = self._ewma(self.global_gap, gap)
            conversation.keys, conversation.last_seen = tuple(keys), now
            conversation.turns += 1

    def end(self, conversation_id: str) -> bool:
        """The conversation is over (no next turn); True if it was live."""
        with self._lock:
            return self._live.pop(conversation_id, None) is not None

    @property
    def live(self) -> int:
        return len(self._live)

    def candidates(self) -> list[PrefetchCandidate]:
        """Live conversations by expected next arrival (earliest first); expired ones are dropped here."""
        with self._lock:
            now = self.clock()
            for cid in [c for c, conv in self._live.items() if now - conv.last_seen > self.live_timeout_s]:
                del self._live[cid]
            ranked = [
                PrefetchCandidate(cid, conv.last_seen + self._gap(conv), self._gap(conv), len(conv.keys))
                for cid, conv in self._live.items()
            ]
        ranked.sort(key=lambda c: (c.expected_at, c.conversation_id))
        return ranked

    def plan(
        self, max_conversations: int | None = None, max_blocks: int | None = None
    ) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
        """Blocks to promote now (prefix order, not in the fast tier, at most `max_blocks`, default the
        prefetcher's own) of at most `max_conversations` conversations (None: all due), and whose."""
        budget = self.max_blocks if max_blocks is None else min(self.max_blocks, max_blocks)
        with self._lock:
            return self._plan(max_conversations, budget)

    def _plan(self, max_conversations: int | None, budget: int) -> tuple[tuple[bytes, ...], tuple[str, ...]]:
        now = self.clock()
        horizon = now + self.lookahead_s
        keys: list[bytes] = []
        chosen: list[str] = []
        seen: set[bytes] = set()
        for candidate in self.candidates():
            if candidate.expected_at > horizon or len(keys) >= budget:
                break
            if max_conversations is not None and len(chosen) >= max_conversations:
                break
            if candidate.expected_at + candidate.gap_s < now:  # overdue by a whole gap: likely gone
                continue
            wanted = self._wanted(self._live[candidate.conversation_id].keys, seen)
            if not wanted:
                continue
            taken = wanted[: budget - len(keys)]
            keys.extend(taken)
            seen.update(taken)
            chosen.append(candidate.conversation_id)
        return tuple(keys), tuple(chosen)

    def _wanted(self, keys: tuple[bytes, ...], seen: set[bytes]) -> list[bytes]:
        """Keys of the usable prefix (up to the first block no tier holds) not yet in the fast tier."""
        wanted: list[bytes] = []
        for k in keys:
            where = self.source.tier_of(k)
            if where is None:  # a block needs all its parents: nothing after a missing one is usable
                break
            if where != self.fast_tier and k not in seen:
                wanted.append(k)
        return wanted

    def step(self, max_conversations: int | None = None, max_blocks: int | None = None) -> PrefetchResult:
        """Plan (see `plan`) and promote; returns what was done."""
        keys, conversations = self.plan(max_conversations, max_blocks)
        promoted = self.source.promote(keys, self.fast_tier) if keys else 0
        with self._lock:
            self.promoted_total += promoted
        return PrefetchResult(len(keys), promoted, conversations)

    def _gap(self, conversation: _Conversation) -> float:
        if conversation.mean_gap is not None:
            return conversation.mean_gap
        return self.global_gap if self.global_gap is not None else self.default_gap_s

    def _ewma(self, current: float | None, sample: float) -> float:
        return sample if current is None else self.gap_alpha * sample + (1 - self.gap_alpha) * current
