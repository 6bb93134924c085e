"""`Namespace`: everything besides the tokens that decides what a block's KV is.

Two blocks share a hash only if their namespaces are equal: same model, same weights, same tokenizer, same
KV dtype, block size, layout and codec, and same tenant salt (so one tenant never hits another's blocks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property

NAMESPACE_FORMAT = "uakv-namespace-v1"
"""Tag hashed with the fields; bump it if the canonical form below ever changes."""

_STR_FIELDS = ("model_id", "weights_fingerprint", "tokenizer_id", "dtype", "codec", "tenant_salt")


@dataclass(frozen=True)
class Namespace:
    """Identity of the KV a block holds, apart from its tokens.

    `digest` is SHA-256 over a canonical JSON of the fields (sorted keys, no spaces, ASCII) prefixed by
    `NAMESPACE_FORMAT`: 32 bytes, identical in every process and on every machine.
    """

    model_id: str
    weights_fingerprint: str
    tokenizer_id: str
    dtype: str
    block_size: int
    layout_version: int
    codec: str = "identity"
    tenant_salt: str = ""

    def __post_init__(self) -> None:
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, str):
                raise ValueError(f"Namespace.{name}={value!r} must be a string")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"Namespace.block_size={self.block_size!r} must be a positive integer")
        version = self.layout_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"Namespace.layout_version={version!r} must be a non-negative integer")

    def canonical_json(self) -> str:
        """The exact text that `digest` hashes (after the format tag)."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    @cached_property
    def digest(self) -> bytes:
        """32-byte SHA-256 of the format tag and the canonical JSON."""
        payload = NAMESPACE_FORMAT.encode("ascii") + b"\0" + self.canonical_json().encode("ascii")
        return hashlib.sha256(payload).digest()

    def with_tenant(self, tenant_salt: str) -> Namespace:
        """The same namespace for another tenant."""
        return Namespace(**{**asdict(self), "tenant_salt": tenant_salt})
