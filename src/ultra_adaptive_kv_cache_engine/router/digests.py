"""What each instance reports holding (`GET /v1/cache/digest`, server/cache_digest.py), and a prompt's block hashes
to match against it.

`InstanceDigest` is one instance's last report: the truncated block hashes it serves from its pool and local
tiers, under its namespace, block size and tokenizer, at a generation. A full report replaces the set; a delta
(`since` = our generation, same `instance`) applies `removed` then `added`; a delta that does not follow ours
(another instance id: a restart) is refused with `StaleDigest` (the poller asks for the full set). Between
reports the router adds the hashes of each request it sent there and was answered (`predict`: the instance
computed or loaded that prefix); a report from a poll that started after them replaces these predictions.

`PromptBlocks` names a prompt's full blocks as the instances' caches do (`prefix/hashing.py`: SHA-256 of the
parent's name or `ROOT_PARENT`, the namespace digest, the token ids as little-endian int64), once per namespace
and block size, truncated to the report's hash size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from ..prefix.hashing import ROOT_PARENT, pack_token_ids


class StaleDigest(ValueError):
    """A delta report that does not follow the generation the router holds."""


def _hashes(answer: dict[str, Any], key: str, size: int) -> set[bytes]:
    values = answer.get(key)
    if not isinstance(values, list):
        raise ValueError(f"digest field {key!r}={values!r:.80}; expected a list of hex block hashes")
    try:
        out = {bytes.fromhex(v) for v in values}
    except (TypeError, ValueError):
        raise ValueError(f"digest field {key!r} holds a value that is not hex") from None
    if any(len(h) != size for h in out):
        raise ValueError(f"digest field {key!r} holds a hash that is not {size} bytes")
    return out


def _field(answer: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = answer.get(key)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"digest field {key!r}={value!r:.80}; expected {kind}")
    return value


class InstanceDigest:
    """One instance's reported cache, plus the router's predictions since (see the module docstring)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forgets everything (the instance failed, or its report was unusable): text chunks route it until the
        next full report."""
        self.instance: str | None = None
        self.namespace = b""
        self.tokenizer = ""
        self.block_size = self.hash_bytes = 0
        self.generation: int | None = None
        self.held: set[bytes] = set()
        self._predicted: dict[bytes, float] = {}

    @property
    def ready(self) -> bool:
        return self.generation is not None

    @property
    def key(self) -> tuple[bytes, int, int]:
        """What a prompt's hashes depend on: (namespace digest, block size, hash bytes)."""
        return self.namespace, self.block_size, self.hash_bytes

    def apply(self, answer: Any, polled_at: float) -> str:
        """Takes a report (the JSON of one poll that started at `polled_at`); returns "full" or "delta".
        ValueError (nothing changed) when it is malformed, StaleDigest when a delta does not follow ours."""
        if not isinstance(answer, dict) or answer.get("object") != "cache.digest":
            raise ValueError(f"not a cache digest: {answer!r:.80}")
        instance, generation = _field(answer, "instance", str), _field(answer, "generation", int)
        size = _field(answer, "hash_bytes", int)
        if answer.get("full") is True:
            held = _hashes(answer, "blocks", size)
            namespace = bytes.fromhex(_field(answer, "namespace", str))
            self.instance, self.namespace, self.tokenizer = instance, namespace, _field(answer, "tokenizer", str)
            self.block_size, self.hash_bytes, self.held = _field(answer, "block_size", int), size, held
            kind = "full"
        else:
            if instance != self.instance or answer.get("since") != self.generation or size != self.hash_bytes:
                raise StaleDigest(f"delta from {instance}@{answer.get('since')!r}, ours is "
                                  f"{self.instance}@{self.generation!r}")
            added, removed = _hashes(answer, "added", size), _hashes(answer, "removed", size)
            self.held -= removed
            self.held |= added
            kind = "delta"
        self.generation = generation
        self._predicted = {h: t for h, t in self._predicted.items() if t >= polled_at}
        return kind

    def predict(self, hashes: Sequence[bytes], now: float) -> None:
        """The instance was sent (and answered) a prompt with these leading block hashes at `now`."""
        for h in hashes:
            self._predicted[h] = now

    def matched(self, hashes: Sequence[bytes]) -> int:
        """How many leading `hashes` the instance holds (reported or predicted); stops at the first it does not."""
        held, predicted = self.held, self._predicted
        for i, h in enumerate(hashes):
            if h not in held and h not in predicted:
                return i
        return len(hashes)


class PromptBlocks:
    """A prompt's token ids and their chained block hashes per (namespace, block size, hash size), computed once."""

    def __init__(self, token_ids: Sequence[int]) -> None:
        self.token_ids = token_ids
        self._hashes: dict[tuple[bytes, int, int], list[bytes]] = {}

    def hashes(self, key: tuple[bytes, int, int]) -> list[bytes]:
        """The truncated hashes of the full blocks under `key` = (namespace digest, block size, hash bytes)."""
        found = self._hashes.get(key)
        if found is None:
            namespace, block_size, size = key
            found = [h[:size] for h in chained_hashes(self.token_ids, namespace, block_size)]
            self._hashes[key] = found
        return found


def chained_hashes(token_ids: Sequence[int], namespace: bytes, block_size: int) -> list[bytes]:
    """The 32-byte names of the full blocks of `token_ids` under the namespace whose digest is `namespace`:
    `prefix.hashing.hash_blocks` computed from the digest alone (the router has no `Namespace`)."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size!r}; expected a positive integer")
    out: list[bytes] = []
    parent = ROOT_PARENT
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hasher = hashlib.sha256(parent)
        hasher.update(namespace)
        hasher.update(pack_token_ids(token_ids[start : start + block_size]))
        parent = hasher.digest()
        out.append(parent)
    return out
