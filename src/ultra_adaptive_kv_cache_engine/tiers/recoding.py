"""`RecodingTier`: a tier that stores every block in its own codec, whatever codec a record arrives in.

A tiered store moves one record between tiers (write-through, demotion, promotion); when the tiers are
configured with different codecs (say identity in CPU memory, zstd on disk, int8 in a shared Redis), the
record is re-encoded on its way in: decoded with the codec its header names (records are self-describing),
encoded with this tier's codec, sealed under the same hash and namespace. Reads pass through: whoever loads a
record decodes it by its own header. Everything else is the wrapped tier's.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..compression import Codec, decode_payload
from .base import FlushResult, PutResult, Tier, TierUsage
from .record import BlockRecord, encode_block


class RecodingTier(Tier):
    """`tier`, storing each record encoded with `codec` (records already in that codec pass as they are)."""

    def __init__(self, tier: Tier, codec: Codec) -> None:
        super().__init__(tier.namespace, tier.name)
        self.tier, self.codec = tier, codec
        self.kind = tier.kind
        self.durable = getattr(tier, "durable", False)

    def _recode(self, record: BlockRecord) -> BlockRecord:
        if record.meta.codec == self.codec.kind:
            return record
        tensor = decode_payload(record.payload, record.meta)
        self.counters.add("recoded")
        return encode_block(record.block_hash, record.namespace, tensor, self.codec)

    def contains(self, key: bytes) -> bool:
        return self.tier.contains(key)

    def get(self, key: bytes) -> BlockRecord | None:
        return self.tier.get(key)

    def get_many(self, keys: Iterable[bytes]) -> list[BlockRecord | None]:
        return self.tier.get_many(keys)

    def put(self, key: bytes, record: BlockRecord) -> PutResult:
        return self.tier.put(key, self._recode(record))

    def put_many(self, items: Iterable[tuple[bytes, BlockRecord]]) -> list[PutResult]:
        return self.tier.put_many([(k, self._recode(r)) for k, r in items])

    def remove(self, key: bytes) -> bool:
        return self.tier.remove(key)

    def usage(self) -> TierUsage:
        return self.tier.usage()

    def flush(self) -> FlushResult:
        return self.tier.flush()

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.tier)

    def __getattr__(self, name: str) -> object:  # capacity_bytes, resize, pin_memory, ... of the wrapped tier
        if name == "tier":
            raise AttributeError(name)
        return getattr(self.tier, name)
