"""The replay loop: a trace's blocks, request by request, through one policy at one capacity.

The rules are those of a live paged cache (`BlockPool` with a policy, driven by the cache manager: new
sequence, append of the missed tokens' KV, commit, free), so that a live replay counts exactly the same
hits, stores and evictions (tests/test_live_replay.py). The same for every policy, the oracle included:
- the cache has ``capacity // block_tokens`` slots; a block takes a whole slot even when partial (a paged
  cache allocates whole blocks); hit and stored tokens count the tokens the block really holds;
- a request needs all its blocks in slots at once: one with more blocks than slots keeps only its first
  `slots` blocks (the rest are misses, never stored: no live cache could hold them);
- each request walks its blocks root first; its hits are the longest run of leading blocks that are cached
  (the prefix rule), each touched (`on_access`), root first, and pinned until the request ends;
- then every missed block gets a slot, all before any is named: free unnamed slots first, then victims of
  the policy among the cached blocks that are not pinned (`policies.pinned.unpinned_victims`, asked once for
  all the request needs), each removed (`on_remove`) before the next step;
- then each missed block in order: one still cached (its prefix was broken: it was recomputed in a new slot)
  causes no event and is not stored again; else `admit` false stops storing the rest of the request (their
  slots stay unnamed), else `on_insert`. At the end of the request every slot is free again, the unnamed
  ones reused first;
- the injected clock reads the request's index, so every event of one request shares one tick.
Policies see sizes of `block_tokens` against a capacity in tokens, where the live pool passes sizes of 1
against a capacity in blocks: the same ratios, the same float results when `block_tokens` is a power of two.
One trace rule has no live counterpart: a trace names a partial last block and the replay stores it, while a
live cache names only full blocks (the live replay test gives every block its full `block_size` tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..base import EvictionPolicy
from ..pinned import unpinned_victims
from .belady import BeladyPolicy
from .trace import BlockId, TraceRequest


@dataclass(frozen=True)
class CompiledTrace:
    """Requests reduced to what the replay reads. Invariant: len(keys[i]) <= ceil(tokens[i] / block_tokens)."""

    name: str
    keys: tuple[tuple[BlockId, ...], ...]
    tokens: tuple[int, ...]
    block_tokens: int

    @property
    def requests(self) -> int:
        return len(self.keys)

    @property
    def blocks(self) -> int:
        return sum(len(k) for k in self.keys)

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens)


def compile_trace(requests: Sequence[TraceRequest], block_tokens: int = 512, name: str = "trace") -> CompiledTrace:
    """Check every request against `block_tokens`; ValueError naming the first request that has too many ids."""
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise ValueError(f"block_tokens={block_tokens!r} must be a positive integer")
    for index, req in enumerate(requests):
        if len(req.hash_ids) * block_tokens - req.input_length >= block_tokens:
            raise ValueError(
                f"request {index}: {len(req.hash_ids)} hash_ids but input_length={req.input_length} needs at "
                f"most {-(-req.input_length // block_tokens)} blocks of {block_tokens} tokens"
            )
    return CompiledTrace(
        name, tuple(r.hash_ids for r in requests), tuple(r.input_length for r in requests), block_tokens
    )


@dataclass(frozen=True)
class ReplayCounts:
    """What one replay counted (blocks and tokens)."""

    hit_blocks: int
    hit_tokens: int
    stored_blocks: int
    stored_tokens: int
    evicted_blocks: int


class RequestClock:
    """A clock that reads the index of the request being replayed."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> float:
        return self.now


class _Replay:
    """One replay in progress: the resident set, the policy and the counters.

    Invariant: `resident` is exactly the set of keys the policy tracks (the named blocks of the live pool),
    and holds at most `slots` keys; between requests the other ``slots - len(resident)`` slots are free and
    unnamed.
    """

    def __init__(self, policy: EvictionPolicy, slots: int, block_tokens: int) -> None:
        self.resident: set[BlockId] = set()
        self.slots, self.bt = slots, block_tokens
        self.policy = policy
        self.oracle = policy if isinstance(policy, BeladyPolicy) else None
        self.hit_blocks = self.hit_tokens = self.stored_blocks = self.stored_tokens = self.evicted = 0

    def request(self, keys: tuple[BlockId, ...], tokens: int, nxt: Sequence[float] | None) -> None:
        resident, policy, oracle = self.resident, self.policy, self.oracle
        keys = keys[: self.slots]
        n, h = len(keys), 0
        while h < n and keys[h] in resident:
            h += 1
        if oracle is not None:  # every block of the request is used now: its next use moves on
            for i in range(n):
                oracle.set_next_use(keys[i], nxt[i])  # type: ignore[index]
        for i in range(h):
            policy.on_access(keys[i])
        self.hit_blocks += h
        self.hit_tokens += min(h * self.bt, tokens)
        self._make_room(n - h, set(keys[:h]))
        for i in range(h, n):
            key = keys[i]
            if key in resident:
                continue
            if oracle is not None:  # it may have been evicted just now, forgetting its next use
                oracle.set_next_use(key, nxt[i])  # type: ignore[index]
            if not policy.admit(key, self.bt):
                return
            policy.on_insert(key, self.bt)
            resident.add(key)
            self.stored_blocks += 1
            self.stored_tokens += min(self.bt, tokens - i * self.bt)

    def _make_room(self, needed: int, pinned: set[BlockId]) -> None:
        """Evicts what `needed` free slots require beyond the free unnamed ones, sparing `pinned`."""
        count = needed - (self.slots - len(self.resident))
        if count <= 0:
            return
        for victim in unpinned_victims(self.policy, count, pinned.__contains__, len(pinned)):
            self.policy.on_remove(victim)
            self.resident.remove(victim)
        self.evicted += count

    def counts(self) -> ReplayCounts:
        return ReplayCounts(self.hit_blocks, self.hit_tokens, self.stored_blocks, self.stored_tokens, self.evicted)


def simulate(
    trace: CompiledTrace,
    policy: EvictionPolicy,
    capacity_tokens: int,
    clock: RequestClock,
    next_use: Sequence[Sequence[float]] | None = None,
    progress: Callable[[int], object] | None = None,
) -> ReplayCounts:
    """Replay `trace` through `policy` (built with `clock`); `next_use` (see `next_uses`) feeds a `BeladyPolicy`."""
    slots = capacity_tokens // trace.block_tokens
    if slots < 1:
        raise ValueError(f"capacity={capacity_tokens!r} tokens holds no block of {trace.block_tokens} tokens")
    if isinstance(policy, BeladyPolicy) and next_use is None:
        raise ValueError("Belady's policy needs next_use (see belady.next_uses)")
    run = _Replay(policy, slots, trace.block_tokens)
    oracle = run.oracle is not None
    for r, (keys, tokens) in enumerate(zip(trace.keys, trace.tokens, strict=True)):
        clock.now = r
        run.request(keys, tokens, next_use[r] if oracle else None)  # type: ignore[index]
        if progress is not None and r % 1024 == 1023:
            progress(1024)
    if progress is not None:
        progress(trace.requests % 1024)
    return run.counts()
