"""The stored block format: one self-checking record per block, the same bytes on disk and in Redis.

Layout (little endian), no pickle:
    offset 0   magic b"UAKVBLK\\0" (8) | format version u16 | reserved u16 (0) | header length u32
    offset 16  block hash (32 bytes)
    offset 48  namespace digest (32 bytes)
    offset 80  payload length u64
    offset 88  JSON header {"codec", "dtype", "shape", "params"} (header length bytes, UTF-8)
               payload (payload length bytes, the codec's output)
    end - 32   checksum: SHA-256 over every byte before it

Invariants: a `BlockRecord` made by `seal` or returned by `parse_record` has a checksum that matches its bytes
(computed when first needed);
tiers pass records along unchanged and verify them again whenever they come back from a medium that can tear
or be shared (disk, Redis). `parse_record` raises `CorruptBlockError` for anything torn, truncated, flipped or
malformed, and `NamespaceMismatchError` for a sound record of another namespace (another model or tenant), so
callers count and drop; it never returns a block that was not written whole under the expected names.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field

import torch

from ..compression import Codec, CodecError, EncodedTensor, TensorMeta, decode_payload

MAGIC = b"UAKVBLK\0"
FORMAT_VERSION = 1
KEY_BYTES = 32
CHECKSUM_BYTES = 32
PREFIX = struct.Struct("<8sHHI32s32sQ")
PREFIX_BYTES = PREFIX.size  # 88
MAX_HEADER_BYTES = 1 << 16


class RecordError(ValueError):
    """A stored block that must not be served."""


class CorruptBlockError(RecordError):
    """Torn, truncated, bit-flipped or malformed bytes, or a record stored under the wrong block hash."""


class NamespaceMismatchError(RecordError):
    """A sound record whose namespace digest is not the reader's (another model, dtype, layout or tenant)."""


def check_key(key: object, what: str = "key") -> bytes:
    """`key` if it is a 32-byte block hash; TypeError/ValueError naming it otherwise."""
    if not isinstance(key, bytes):
        raise TypeError(f"{what} must be bytes (a 32-byte block hash), got {type(key).__name__}")
    if len(key) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}: {key[:8].hex()}...")
    return key


@dataclass(frozen=True)
class RecordPrefix:
    """The fixed-size start of a record: enough to index a file without reading its payload."""

    block_hash: bytes
    namespace: bytes
    header_len: int
    payload_len: int

    @property
    def total_len(self) -> int:
        return PREFIX_BYTES + self.header_len + self.payload_len + CHECKSUM_BYTES


@dataclass(frozen=True, eq=False)
class BlockRecord:
    """One block as stored: names, tensor meta, payload, and the checksum of its serialised bytes.

    The checksum is computed once, lazily, the first time the record is serialised (a record that only ever
    lives in CPU memory never pays for it); a parsed record carries the checksum it was verified against.
    """

    block_hash: bytes
    namespace: bytes
    meta: TensorMeta
    payload: bytes | memoryview
    header: bytes  # the serialised fixed prefix + JSON header
    verified_checksum: bytes | None = field(default=None, repr=False)

    @property
    def checksum(self) -> bytes:
        """SHA-256 of header + payload (computed on first use; idempotent, so safe from several threads)."""
        if self.verified_checksum is None:
            digest = hashlib.sha256(self.header)
            digest.update(self.payload)
            object.__setattr__(self, "verified_checksum", digest.digest())
        return self.verified_checksum  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Size of the serialised record: what a tier stores and counts against its capacity."""
        return len(self.header) + memoryview(self.payload).nbytes + CHECKSUM_BYTES

    def chunks(self) -> tuple[bytes | memoryview, ...]:
        """The serialised record in pieces (write them in order; no concatenation copy)."""
        return (self.header, self.payload, self.checksum)

    def to_bytes(self) -> bytes:
        return b"".join(self.chunks())

    def tensor(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block's tensor (CPU), or `out` filled; CorruptBlockError if the payload does not decode."""
        try:
            return decode_payload(self.payload, self.meta, out)
        except CodecError as exc:
            raise CorruptBlockError(f"block {self.block_hash.hex()[:16]}: {exc}") from None


def seal(block_hash: bytes, namespace: bytes, encoded: EncodedTensor) -> BlockRecord:
    """The record of `encoded` under `block_hash` in `namespace` (checksum computed when first serialised)."""
    check_key(block_hash, "block_hash")
    check_key(namespace, "namespace")
    header_json = json.dumps(encoded.meta.as_json(), separators=(",", ":"), sort_keys=True).encode()
    if len(header_json) > MAX_HEADER_BYTES:
        raise ValueError(f"tensor meta serialises to {len(header_json)} bytes; at most {MAX_HEADER_BYTES}")
    payload_len = memoryview(encoded.payload).nbytes
    prefix = PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_json), block_hash, namespace, payload_len)
    return BlockRecord(block_hash, namespace, encoded.meta, encoded.payload, prefix + header_json)


def encode_block(block_hash: bytes, namespace: bytes, tensor: torch.Tensor, codec: Codec) -> BlockRecord:
    """Encode `tensor` with `codec` and seal it (the tensor may be reused by the caller at once)."""
    return seal(block_hash, namespace, codec.encode(tensor))


def parse_prefix(data: bytes | memoryview) -> RecordPrefix:
    """The fixed prefix of `data` (at least PREFIX_BYTES long); CorruptBlockError if it is not a record."""
    view = memoryview(data).cast("B")
    if view.nbytes < PREFIX_BYTES:
        raise CorruptBlockError(f"record has {view.nbytes} bytes; the fixed prefix alone needs {PREFIX_BYTES}")
    magic, version, _reserved, header_len, block_hash, namespace, payload_len = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptBlockError(f"record starts with {bytes(magic)!r}; expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CorruptBlockError(f"record format version {version}; this build reads {FORMAT_VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise CorruptBlockError(f"record header length {header_len} exceeds {MAX_HEADER_BYTES}")
    return RecordPrefix(bytes(block_hash), bytes(namespace), header_len, payload_len)


def check_names(prefix: RecordPrefix, expected_hash: bytes | None, expected_namespace: bytes | None) -> None:
    """Raise unless the record is named `expected_hash` in `expected_namespace` (None: not checked)."""
    if expected_namespace is not None and prefix.namespace != expected_namespace:
        raise NamespaceMismatchError(
            f"block {prefix.block_hash.hex()[:16]} belongs to namespace {prefix.namespace.hex()[:16]}, "
            f"not {expected_namespace.hex()[:16]}"
        )
    if expected_hash is not None and prefix.block_hash != expected_hash:
        raise CorruptBlockError(
            f"record holds block {prefix.block_hash.hex()[:16]} but is stored as {expected_hash.hex()[:16]}"
        )


def parse_record(
    data: bytes | memoryview, expected_hash: bytes | None = None, expected_namespace: bytes | None = None
) -> BlockRecord:
    """Verify and parse serialised record bytes. Checks, in order: prefix, exact length, checksum, names, meta."""
    view = memoryview(data).cast("B")
    prefix = parse_prefix(view)
    if view.nbytes != prefix.total_len:
        raise CorruptBlockError(f"record has {view.nbytes} bytes; its prefix says {prefix.total_len}")
    body_end = prefix.total_len - CHECKSUM_BYTES
    checksum = bytes(view[body_end:])
    if hashlib.sha256(view[:body_end]).digest() != checksum:
        raise CorruptBlockError(f"checksum mismatch for block {prefix.block_hash.hex()[:16]}")
    check_names(prefix, expected_hash, expected_namespace)
    header_end = PREFIX_BYTES + prefix.header_len
    try:
        meta = TensorMeta.from_json(json.loads(bytes(view[PREFIX_BYTES:header_end])))
    except (UnicodeDecodeError, json.JSONDecodeError, CodecError) as exc:
        raise CorruptBlockError(f"record header of block {prefix.block_hash.hex()[:16]} is invalid: {exc}") from None
    header = bytes(view[:header_end])
    return BlockRecord(prefix.block_hash, prefix.namespace, meta, view[header_end:body_end], header, checksum)
