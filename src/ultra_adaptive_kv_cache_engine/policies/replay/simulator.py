"""The replay loop: a trace's blocks, request by request, through one policy at one capacity.

Rules (the same for every policy, the oracle included):
- each request walks its blocks root first; a block is a hit only while every earlier block of the same
  request was a hit (the prefix rule); after the first miss the rest of the request are misses;
- a missed block that is cached (its prefix was broken) is touched (`on_access`) and not stored again;
  a missed block that is not cached is offered: `admit` false stops storing the rest of the request (its
  blocks would be unreachable), else victims are evicted until one block fits, then `on_insert`;
- a block takes `block_tokens` of capacity even when partial (a paged cache allocates whole blocks); hit
  and stored tokens count the tokens the block really holds;
- blocks of the request being replayed are not pinned: a policy may evict them to make room;
- the injected clock reads the request's index, so every event of one request shares one tick.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..base import EvictionPolicy
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
    """One replay in progress: the resident set, the policy's bound methods and the counters.

    Invariant: `resident` is exactly the set of keys the policy tracks, and holds at most `slots` keys.
    """

    def __init__(self, policy: EvictionPolicy, slots: int, block_tokens: int) -> None:
        self.resident: set[BlockId] = set()
        self.slots, self.bt = slots, block_tokens
        self.oracle = policy if isinstance(policy, BeladyPolicy) else None
        self.access, self.insert, self.remove = policy.on_access, policy.on_insert, policy.on_remove
        self.admit, self.victims = policy.admit, policy.victims
        self.hit_blocks = self.hit_tokens = self.stored_blocks = self.stored_tokens = self.evicted = 0

    def request(self, keys: tuple[BlockId, ...], tokens: int, nxt: Sequence[float] | None) -> None:
        resident, access, oracle = self.resident, self.access, self.oracle
        n, h = len(keys), 0
        while h < n and keys[h] in resident:
            if oracle is not None:
                oracle.set_next_use(keys[h], nxt[h])  # type: ignore[index]
            access(keys[h])
            h += 1
        self.hit_blocks += h
        self.hit_tokens += min(h * self.bt, tokens)
        for i in range(h, n):
            key = keys[i]
            if oracle is not None:
                oracle.set_next_use(key, nxt[i])  # type: ignore[index]
            if key in resident:
                access(key)
            elif self.admit(key, self.bt):
                self._store(key, min(self.bt, tokens - i * self.bt))
            else:
                if oracle is not None:  # the skipped cached blocks' next uses still move on
                    for j in range(i + 1, n):
                        if keys[j] in resident:
                            oracle.set_next_use(keys[j], nxt[j])  # type: ignore[index]
                return

    def _store(self, key: BlockId, tokens: int) -> None:
        resident = self.resident
        while len(resident) >= self.slots:
            (victim,) = self.victims(1)
            self.remove(victim)
            resident.remove(victim)
            self.evicted += 1
        self.insert(key, self.bt)
        resident.add(key)
        self.stored_blocks += 1
        self.stored_tokens += tokens

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
