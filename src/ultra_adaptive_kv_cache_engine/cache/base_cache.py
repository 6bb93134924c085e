"""`BaseKVCache`: the seed's content-addressed tensor cache, an `nn.Module` with a token capacity.

`store(key, value)` names the entry by a digest of the key tensor (dtype, shape, bytes); `retrieve(key)`
returns a copy of the value or None. Two capacities hold at once, both enforced by evicting through the policy
that the configured strategy names in the policy registry: `config.max_tokens` (an entry of shape
(..., tokens, dim) counts `tokens`; a 0-D or 1-D value counts 1) and `config.max_store_bytes` (an entry counts
`numel * element size`, what its private copy takes). Values of a dtype a snapshot cannot hold (quantized,
complex, sparse) and keys over `keys.MAX_KEY_BYTES` are refused with ValueError.

Books and extension points. The base class keeps the books itself, in `store`, around the subclass hooks:
`_entries` (key digest -> `CacheEntry`, oldest first), the token count and the policy. So a subclass that
overrides the seed's hooks without calling `super()` still has working `retrieve`, capacity and persistence:
- `_store(key, value)`: called by `store` once capacity is made, before the books record the entry. The
  default does nothing (the books hold the value); override it for a side effect or your own storage.
- `_retrieve(key)`: the value for a key the books hold (a copy), or None (counted as a miss). Override it
  together with `_store` when you store elsewhere; it is only asked about keys the books hold.
- `_evict(num_tokens)`: free at least `num_tokens` tokens. The default asks the policy for victims; an
  override chooses its own and drops each with `self._remove(digest)` (tokens freed), or calls
  `super()._evict(n)`. If an override leaves too little room, the store is refused with a RuntimeError
  naming the shortfall (nothing of that entry is recorded; what `_evict` dropped stays dropped).
The books keep a private copy of every value: it is what `snapshot` and the engine's `persist` write. Each
entry also carries the `stamp` of the snapshot write it came from (None once stored or re-stored in memory),
which `SharedSnapshot` uses to merge snapshots without losing another engine's entries.

Ownership: stored values are private clones; `retrieve` hands out clones, so callers may modify what they get.
Thread-safety: every public method holds `self._lock` (an RLock).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import KVCacheConfig
from ..metrics import LOGGER_NAME, Counters
from ..policies import EvictionPolicy, has_policy, make_policy
from .keys import STORABLE_DTYPES, all_finite, check_key_tensor, entry_bytes, entry_tokens, tensor_digest


@dataclass(slots=True)
class _Book:
    """Mutable bookkeeping kept off `nn.Module.__setattr__` (slow) on the hot path."""

    tokens: int = 0
    nbytes: int = 0
    pending: tuple[torch.Tensor, bytes] | None = None


@dataclass(slots=True)
class CacheEntry:
    """One stored value, the tokens it occupies, and the stamp of the snapshot write it is unchanged since
    (None: stored in memory since it was last written or read)."""

    value: torch.Tensor
    tokens: int
    stamp: str | None = None


class BaseKVCache(nn.Module):
    """Base class for all KV cache implementations."""

    def __init__(self, config: KVCacheConfig) -> None:
        super().__init__()
        if not isinstance(config, KVCacheConfig):
            raise TypeError(f"config must be a KVCacheConfig, got {type(config).__name__}")
        self.config = config
        self.logger = logging.getLogger(LOGGER_NAME)
        self._lock = threading.RLock()
        self.counters = Counters()
        self.policy: EvictionPolicy | None = self._make_policy()
        self._entries: dict[bytes, CacheEntry] = {}
        self._book = _Book()

    # ----------------------------------------------------------------- policy
    def _policy_name(self) -> str:
        return self.config.cache_strategy.value

    def _make_policy(self) -> EvictionPolicy | None:
        name = self._policy_name()
        if not has_policy(name):
            self.logger.debug("strategy %r has no registered policy; _evict must be overridden", name)
            return None
        return make_policy(name, capacity=self.config.max_tokens)

    # ----------------------------------------------------------------- public API
    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    @property
    def num_bytes(self) -> int:
        """Bytes the stored values occupy (numel * element size each), at most `config.max_store_bytes`."""
        return self._book.nbytes

    @property
    def num_tokens(self) -> int:
        """Tokens currently held."""
        return self._book.tokens

    def store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Cache `value` under the content of `key`, evicting through the policy when over capacity.

        Raises TypeError/ValueError (naming the bad input) and leaves the cache unchanged on bad input.
        """
        tokens = self._validate(key, value)
        digest = tensor_digest(key)
        with self._lock:
            self._make_room(digest, tokens)
            self._make_byte_room(digest, entry_bytes(value))
            self._book.pending = (key, digest)
            try:
                self._store(key, value)
            finally:
                self._book.pending = None
            self._record(digest, CacheEntry(value.detach().clone(), tokens))
            self.counters.add("stores")

    def retrieve(self, key: torch.Tensor) -> torch.Tensor | None:
        """A copy of the value stored under `key`'s content, or None (counted as a miss)."""
        if not isinstance(key, torch.Tensor):
            raise TypeError(f"key must be a torch.Tensor, got {type(key).__name__}")
        digest = tensor_digest(key)
        with self._lock:
            value = None
            if digest in self._entries:
                self._book.pending = (key, digest)
                try:
                    value = self._retrieve(key)
                finally:
                    self._book.pending = None
            if value is None:
                self.counters.add("misses")
                return None
            self.counters.add("hits")
            if self.policy is not None:
                self.policy.on_access(digest)
            return value

    def contains(self, key: torch.Tensor) -> bool:
        if not isinstance(key, torch.Tensor):
            raise TypeError(f"key must be a torch.Tensor, got {type(key).__name__}")
        digest = tensor_digest(key)
        with self._lock:
            return digest in self._entries

    def __contains__(self, key: object) -> bool:
        return isinstance(key, torch.Tensor) and self.contains(key)

    def evict(self, num_tokens: int) -> int:
        """Evict at least `num_tokens` tokens (fewer if the cache holds fewer); returns tokens freed."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise ValueError(f"num_tokens={num_tokens!r} must be a non-negative integer")
        with self._lock:
            before = self._book.tokens
            if num_tokens:
                self._evict(min(num_tokens, before))
            return before - self._book.tokens

    def clear(self) -> None:
        with self._lock:
            for digest in list(self._entries):
                self._remove(digest)

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self.counters.snapshot()
            hits, misses = c.get("hits", 0), c.get("misses", 0)
            return {
                "strategy": self.config.cache_strategy.value,
                "entries": len(self._entries),
                "tokens": self._book.tokens,
                "max_tokens": self.max_tokens,
                "hits": hits,
                "misses": misses,
                "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
                "stores": c.get("stores", 0),
                "evictions": c.get("evictions", 0),
            }

    def snapshot(self) -> dict[bytes, torch.Tensor]:
        """Every entry (key digest -> value), the values shared, not copied: do not modify them."""
        with self._lock:
            return {digest: entry.value for digest, entry in self._entries.items()}

    def stamped(self) -> dict[bytes, CacheEntry]:
        """Every entry (key digest -> a copy of its `CacheEntry`, value shared: do not modify it)."""
        with self._lock:
            return {d: CacheEntry(e.value, e.tokens, e.stamp) for d, e in self._entries.items()}

    def restore(self, entries: Mapping[bytes, torch.Tensor], stamps: Mapping[bytes, str] | None = None) -> int:
        """Adds snapshot entries (key digest -> value, kept as given: not copied) not already held, in order,
        evicting as `store` does (a restored entry can evict one restored before it); entries larger than the
        capacity are skipped. `stamps` (digest -> stamp) name the snapshot write each came from. Returns how
        many were added (some may have been evicted again by later ones)."""
        added = 0
        with self._lock:
            for digest, value in entries.items():
                tokens = entry_tokens(value)
                if (digest in self._entries or tokens > self.max_tokens
                        or entry_bytes(value) > self.config.max_store_bytes or value.dtype not in STORABLE_DTYPES):
                    continue
                self._make_room(digest, tokens)
                self._make_byte_room(digest, entry_bytes(value))
                self._record(digest, CacheEntry(value, tokens, stamps.get(digest) if stamps else None))
                added += 1
        return added

    def mark_written(self, written: Mapping[bytes, tuple[torch.Tensor, str]]) -> None:
        """Stamps the entries just written to a snapshot (digest -> (the value object written, its stamp)),
        unless an entry was replaced since (its value is no longer that object)."""
        with self._lock:
            for digest, (value, stamp) in written.items():
                entry = self._entries.get(digest)
                if entry is not None and entry.value is value:
                    entry.stamp = stamp

    # ----------------------------------------------------------------- extension points
    def _store(self, key: torch.Tensor, value: torch.Tensor) -> None:
        """Hook called by `store` with capacity made, before the books record `value` (they keep their own
        copy). The default does nothing; `self._digest_of(key)` names the entry without hashing again."""

    def _retrieve(self, key: torch.Tensor) -> torch.Tensor | None:
        """The value for `key`, which the books hold: by default a copy of the books' value."""
        return self._entries[self._digest_of(key)].value.clone()

    def _evict(self, num_tokens: int) -> None:
        """Free at least `num_tokens` tokens, victims chosen by the policy. Subclasses may replace this."""
        if self.policy is None:
            raise RuntimeError(
                f"strategy {self._policy_name()!r} has no eviction policy registered; register one with "
                "register_strategy(name, policy=...) or override _evict"
            )
        freed = 0
        while freed < num_tokens and self._entries:
            victims = self.policy.victims(1)
            if not victims:
                break
            freed += self._remove(victims[0])
            self.counters.add("evictions")

    # ----------------------------------------------------------------- helpers
    def _make_room(self, digest: bytes, tokens: int) -> None:
        """Evict through `_evict` so that `tokens` more (replacing `digest`'s entry, if held) fit; RuntimeError,
        with nothing of this entry recorded, when `_evict` leaves too little room."""
        old = self._entries.get(digest)
        need = self._book.tokens - (old.tokens if old else 0) + tokens - self.max_tokens
        if need <= 0:
            return
        self._evict(need)
        old = self._entries.get(digest)
        over = self._book.tokens - (old.tokens if old else 0) + tokens - self.max_tokens
        if over > 0:
            raise RuntimeError(
                f"{type(self).__name__}._evict({need}) left {over} token(s) too few for an entry of {tokens} "
                f"within max_tokens={self.max_tokens}; _evict must free at least num_tokens (drop entries with "
                "self._remove(digest), or call super()._evict(num_tokens) to evict through the policy)"
            )

    def _make_byte_room(self, digest: bytes, nbytes: int) -> None:
        """Evict (one `_evict(1)` at a time) until `nbytes` more fit within max_store_bytes; RuntimeError if
        `_evict` stops freeing anything first."""
        old = self._entries.get(digest)
        while self._book.nbytes - (entry_bytes(old.value) if old else 0) + nbytes > self.config.max_store_bytes:
            before = len(self._entries)
            self._evict(1)
            if len(self._entries) >= before:
                raise RuntimeError(f"{type(self).__name__}._evict freed nothing; an entry of {nbytes} bytes does not "
                                   f"fit within max_store_bytes={self.config.max_store_bytes}")
            old = self._entries.get(digest)

    def _record(self, digest: bytes, entry: CacheEntry) -> None:
        """Put `entry` in the books under `digest` (replacing any older one) and tell the policy."""
        old = self._entries.pop(digest, None)
        if old is not None:
            self._book.tokens -= old.tokens
            self._book.nbytes -= entry_bytes(old.value)
            if self.policy is not None:
                self.policy.on_remove(digest)
        self._entries[digest] = entry
        self._book.tokens += entry.tokens
        self._book.nbytes += entry_bytes(entry.value)
        if self.policy is not None:
            self.policy.on_insert(digest, entry.tokens)

    def _digest_of(self, key: torch.Tensor) -> bytes:
        pending = self._book.pending
        if pending is not None and pending[0] is key:
            return pending[1]
        return tensor_digest(key)

    def _remove(self, digest: Hashable) -> int:
        """Drop one entry from the books by digest; returns the tokens freed (0 if absent). `_evict` overrides
        call this for each victim."""
        entry = self._entries.pop(digest, None)  # type: ignore[arg-type]
        if self.policy is not None:
            self.policy.on_remove(digest)
        if entry is None:
            return 0
        self._book.tokens -= entry.tokens
        self._book.nbytes -= entry_bytes(entry.value)
        return entry.tokens

    def _validate(self, key: Any, value: Any) -> int:
        for name, t in (("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_key_tensor(key)
        if value.layout is not torch.strided or value.dtype not in STORABLE_DTYPES:
            raise ValueError(f"value of dtype {value.dtype} and layout {value.layout} cannot be stored (a snapshot "
                             "holds dense bool, integer and floating-point tensors); dequantize or convert it first")
        if value.numel() == 0:
            raise ValueError(f"value of shape {tuple(value.shape)} is empty; expected at least one element")
        if self.config.reject_non_finite and not all_finite(value):
            raise ValueError(
                "value contains NaN or Inf; expected finite values (set reject_non_finite=False to allow them)"
            )
        tokens = entry_tokens(value)
        if tokens > self.max_tokens:
            raise ValueError(
                f"entry of {tokens} tokens (value shape {tuple(value.shape)}) is larger than the whole "
                f"capacity max_tokens={self.max_tokens}"
            )
        if entry_bytes(value) > self.config.max_store_bytes:
            raise ValueError(f"value of shape {tuple(value.shape)} is {entry_bytes(value)} bytes, more than the whole "
                             f"capacity max_store_bytes={self.config.max_store_bytes}")
        return tokens
