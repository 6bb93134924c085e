"""`TierAuth`: block names and value tags in a shared tier, keyed by a secret (HMAC-SHA256).

Why: a block's hash is a public function of its tokens and namespace (`prefix/`), and a record's checksum
(XXH3) is public too. Without a secret, anyone who can write to a shared tier can compute the name of any
prompt's blocks, store records there that are served, and probe with EXISTS whether a tenant sent a prompt.

With a secret, for the namespace digest `ns`:
- key      k     = HMAC-SHA256(secret, "uakv-tier-v1\\0" || ns)   (derived per namespace; the secret itself is
  never kept by this object nor stored anywhere);
- scope          = HMAC(k, "scope")[:16] hex: replaces the namespace hex in stored names;
- name     n(h)  = HMAC(k, "name\\0" || h): the name a block of hash h is stored under;
- value          = tag || record with its block hash and namespace fields zeroed, where
  tag            = HMAC(k, "tag\\0" || n(h) || zeroed record).
So a party without the secret can neither compute a name (no probing), nor produce a value that verifies (no
forgery), nor move a value under another name (the tag binds the name), nor learn from a stored value which
block it holds (the names in it are zeroed; `open` puts them back before the record is parsed).

Not hidden: the payload bytes themselves (KV values) are stored in clear; a party that can compute the KV of a
guessed prompt with the same weights can compare it with stored payloads. Encrypting payloads is out of scope.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from .record import BlockRecord, CorruptBlockError

TAG_BYTES = 32
MIN_SECRET_BYTES = 16
_HASH_AT = slice(16, 48)
_NAMESPACE_AT = slice(48, 80)
_ZERO_NAMES = bytes(64)


def secret_bytes(secret: str | bytes) -> bytes:
    """`secret` as bytes (UTF-8 for text); ValueError if shorter than MIN_SECRET_BYTES."""
    raw = secret.encode() if isinstance(secret, str) else secret
    if not isinstance(raw, bytes) or len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"tier_secret must be at least {MIN_SECRET_BYTES} bytes (got "
                         f"{len(raw) if isinstance(raw, bytes) else type(secret).__name__}); use e.g. "
                         "`python -c 'import secrets; print(secrets.token_hex(32))'`")
    return raw


class TierAuth:
    """Names and tags for one namespace. Thread-safe (immutable after construction)."""

    __slots__ = ("_key", "scope")

    def __init__(self, secret: str | bytes, namespace: bytes) -> None:
        self._key = hmac.new(secret_bytes(secret), b"uakv-tier-v1\0" + namespace, hashlib.sha256).digest()
        self.scope = hmac.new(self._key, b"scope", hashlib.sha256).hexdigest()[:32]

    def __repr__(self) -> str:
        return f"TierAuth(scope={self.scope})"

    def name(self, block_hash: bytes) -> bytes:
        """The 32-byte name block `block_hash` is stored under."""
        return hmac.new(self._key, b"name\0" + block_hash, hashlib.sha256).digest()

    def seal(self, record: BlockRecord) -> list[bytes | memoryview]:
        """The stored value of `record` in pieces: tag, zeroed header, payload, checksum."""
        header = bytearray(record.header)
        header[16:80] = _ZERO_NAMES
        parts: list[bytes | memoryview] = [bytes(header), record.payload, record.checksum]
        return [self._tag(self.name(record.block_hash), parts), *parts]

    def open(self, block_hash: bytes, namespace: bytes, value: bytes | memoryview) -> bytearray:
        """The record bytes of a stored `value` read under block `block_hash`'s name, names restored (ready for
        `parse_record`); CorruptBlockError if the tag does not verify (forged, moved, torn or not ours)."""
        view = memoryview(value).cast("B")
        if view.nbytes < TAG_BYTES + 80:
            raise CorruptBlockError(f"authenticated value of {view.nbytes} bytes is too short")
        body = view[TAG_BYTES:]
        if not hmac.compare_digest(self._tag(self.name(block_hash), [body]), view[:TAG_BYTES]):
            raise CorruptBlockError(f"value under the name of block {block_hash.hex()[:16]} fails its tag")
        out = bytearray(body)
        if out[16:80] != _ZERO_NAMES:
            raise CorruptBlockError(f"authenticated value of block {block_hash.hex()[:16]} carries names")
        out[_HASH_AT] = block_hash
        out[_NAMESPACE_AT] = namespace
        return out

    def _tag(self, name: bytes, parts: Sequence[bytes | memoryview]) -> bytes:
        mac = hmac.new(self._key, b"tag\0" + name, hashlib.sha256)
        for part in parts:
            mac.update(part)
        return mac.digest()
