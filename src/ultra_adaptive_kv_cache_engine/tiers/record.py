"""The stored block format: one self-checking record per block, the same bytes on disk and in Redis.

Layout (little endian), no pickle:
    offset 0   magic b"UAKVBLK\\0" (8) | format version u16 | reserved u16 (0) | header length u32
    offset 16  block hash (32 bytes)
    offset 48  namespace digest (32 bytes)
    offset 80  payload length u64
    offset 88  JSON header {"codec", "dtype", "shape", "params"} (header length bytes, UTF-8), space-padded so
               that the payload starts at a multiple of PAYLOAD_ALIGN (64) bytes
               payload (payload length bytes, the codec's output)
    end - 16   checksum: XXH3-128 over every byte before it

The checksum only detects torn, truncated or flipped bytes; what a block IS is named by its block hash (a
cryptographic chain hash of the tokens and the namespace, computed by `prefix/`), which the record carries and
every reader checks. A non-cryptographic 128-bit checksum is therefore enough, and it runs at memory speed
(tens of GB/s per core) where SHA-256 ran at 1-2 GB/s and bounded every disk and Redis read. Version 1 records
(SHA-256 checksums) are rejected by name (`UnsupportedFormatError`), so they are dropped and recomputed.

Invariants: a `BlockRecord` made by `seal` or returned by `parse_record` has a checksum that matches its bytes
(computed when first needed);
tiers pass records along unchanged and verify them again whenever they come back from a medium that can tear
or be shared (disk, Redis). `parse_record` raises `CorruptBlockError` for anything torn, truncated, flipped or
malformed, and `NamespaceMismatchError` for a sound record of another namespace (another model or tenant), so
callers count and drop; it never returns a block that was not written whole under the expected names.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from dataclasses import dataclass, field

import torch

try:
    import xxhash
except ImportError as exc:  # a declared dependency; say which package is missing rather than fail obscurely
    raise ImportError("stored blocks are checksummed with XXH3: install the 'xxhash' package") from exc

from ..compression import Codec, CodecError, EncodedTensor, TensorMeta, decode_payload, make_codec
from ..compression.codec import dtype_name, uint8_view, writable_bytes
from ..types import CodecKind

MAGIC = b"UAKVBLK\0"
FORMAT_VERSION = 2
KEY_BYTES = 32
CHECKSUM_BYTES = 16
PREFIX = struct.Struct("<8sHHI32s32sQ")
PREFIX_BYTES = PREFIX.size  # 88
MAX_HEADER_BYTES = 1 << 16
PAYLOAD_ALIGN = 64
"""The payload starts at a multiple of this many bytes: a file read lands it in 64-byte-aligned memory (torch
allocations, pool slots) with source and destination equally aligned, the kernel's fast copy (a quarter faster
than a misaligned one, measured)."""


class RecordError(ValueError):
    """A stored block that must not be served."""


class CorruptBlockError(RecordError):
    """Torn, truncated, bit-flipped or malformed bytes, or a record stored under the wrong block hash."""


class UnsupportedFormatError(CorruptBlockError):
    """A record written in a format version this build does not read (dropped like a corrupt one)."""


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
    A `borrowed` record (`borrow_block`) has a payload that IS a caller's tensor memory: it is valid only while
    that tensor is unchanged, so whatever keeps a record past the call (a CPU tier, a write queue) keeps
    `owned()` instead.
    """

    block_hash: bytes
    namespace: bytes
    meta: TensorMeta
    payload: bytes | memoryview
    header: bytes  # the serialised fixed prefix + JSON header
    verified_checksum: bytes | None = field(default=None, repr=False)
    borrowed: bool = False

    @property
    def checksum(self) -> bytes:
        """XXH3-128 of header + payload (computed on first use; idempotent, so safe from several threads)."""
        if self.verified_checksum is None:
            object.__setattr__(self, "verified_checksum", checksum_of(self.header, self.payload))
        return self.verified_checksum  # type: ignore[return-value]

    @property
    def nbytes(self) -> int:
        """Size of the serialised record: what a tier stores and counts against its capacity."""
        return len(self.header) + memoryview(self.payload).nbytes + CHECKSUM_BYTES

    def owned(self) -> BlockRecord:
        """This record, or for a borrowed one a copy with a payload of its own (same bytes, same checksum)."""
        if not self.borrowed:
            return self
        return dataclasses.replace(self, payload=bytes(self.payload), borrowed=False)

    def payload_tensor(self) -> torch.Tensor:
        """The payload as a 1-D uint8 CPU tensor ALIASING it (no copy): page-locked exactly when the payload's
        memory is (a pinning CPU tier's records), so it can be the source of an asynchronous host-to-device
        copy. Read it, never write into it (a parsed or borrowed payload belongs to someone else)."""
        return uint8_view(self.payload)

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


def checksum_of(*parts: bytes | memoryview) -> bytes:
    """The record checksum (XXH3-128) of the concatenation of `parts`, streamed: no concatenation copy."""
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    return digest.digest()


def meta_json(meta: TensorMeta) -> bytes:
    """The JSON header of `meta` exactly as a record carries it: compact, sorted keys (one text per meta), then
    spaces up to the next multiple of PAYLOAD_ALIGN bytes from the record's start (JSON ignores them)."""
    params = json.dumps(dict(meta.params), separators=(",", ":"), sort_keys=True) if meta.params else "{}"
    shape = ",".join(str(int(d)) for d in meta.shape)  # keys in sorted order; codec and dtype need no escaping
    text = f'{{"codec":"{meta.codec.value}","dtype":"{meta.dtype}","params":{params},"shape":[{shape}]}}'.encode()
    return text + b" " * (-(PREFIX_BYTES + len(text)) % PAYLOAD_ALIGN)


def raw_header(out: torch.Tensor) -> bytes:
    """The JSON header of an identity-coded block of `out`'s dtype and shape: the record whose payload IS `out`'s
    bytes carries exactly this (TypeError for a dtype no record stores)."""
    return meta_json(TensorMeta(CodecKind.IDENTITY, dtype_name(out.dtype), tuple(int(d) for d in out.shape)))


def record_head(block_hash: bytes, namespace: bytes, header_json: bytes, payload_len: int) -> bytes:
    """The bytes a record starts with (fixed prefix + JSON header), everything before the payload."""
    return PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_json), block_hash, namespace, payload_len) + header_json


def seal(block_hash: bytes, namespace: bytes, encoded: EncodedTensor) -> BlockRecord:
    """The record of `encoded` under `block_hash` in `namespace` (checksum computed when first serialised)."""
    check_key(block_hash, "block_hash")
    check_key(namespace, "namespace")
    header_json = meta_json(encoded.meta)
    if len(header_json) > MAX_HEADER_BYTES:
        raise ValueError(f"tensor meta serialises to {len(header_json)} bytes; at most {MAX_HEADER_BYTES}")
    header = record_head(block_hash, namespace, header_json, memoryview(encoded.payload).nbytes)
    return BlockRecord(block_hash, namespace, encoded.meta, encoded.payload, header)


def encode_block(block_hash: bytes, namespace: bytes, tensor: torch.Tensor, codec: Codec) -> BlockRecord:
    """Encode `tensor` with `codec` and seal it (the tensor may be reused by the caller at once)."""
    return seal(block_hash, namespace, codec.encode(tensor))


def borrow_block(block_hash: bytes, namespace: bytes, tensor: torch.Tensor) -> BlockRecord:
    """The identity record of `tensor` with NO copy: its payload is the tensor's own memory (`borrowed`).

    For writing a CPU block to a tier that writes it out before `put` returns (disk, Redis): the bytes go from
    the tensor to the medium directly. The caller must not change the tensor until `put` has returned; tiers
    and queues that keep records take a copy (`owned()`). A tensor that is not a contiguous CPU tensor is
    encoded with one copy, as `encode_block` would (the record is then not borrowed).
    """
    return _raw_record(block_hash, namespace, tensor, borrowed=True)


def adopt_block(block_hash: bytes, namespace: bytes, tensor: torch.Tensor) -> BlockRecord:
    """The identity record of `tensor` with NO copy, the tensor given away: its memory becomes the payload, which
    tiers keep as it is (a page-locked tensor stays page-locked in a pinning CPU tier). The caller must never
    change the tensor again. A tensor that is not a contiguous CPU tensor is encoded with one copy."""
    return _raw_record(block_hash, namespace, tensor, borrowed=False)


def _raw_record(block_hash: bytes, namespace: bytes, tensor: torch.Tensor, borrowed: bool) -> BlockRecord:
    view = writable_bytes(tensor) if isinstance(tensor, torch.Tensor) else None
    if view is None:
        return encode_block(block_hash, namespace, tensor, make_codec(CodecKind.IDENTITY))
    check_key(block_hash, "block_hash")
    check_key(namespace, "namespace")
    meta = TensorMeta(CodecKind.IDENTITY, dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape))
    header = record_head(block_hash, namespace, meta_json(meta), view.nbytes)
    # a borrowed payload is read-only (the caller's memory); an adopted one is the record's own, left writable so
    # that aliasing it as a tensor (`payload_tensor`) needs no guard against torch's read-only-buffer warning
    return BlockRecord(block_hash, namespace, meta, view.toreadonly() if borrowed else view, header, borrowed=borrowed)


def parse_prefix(data: bytes | memoryview) -> RecordPrefix:
    """The fixed prefix of `data` (at least PREFIX_BYTES long); CorruptBlockError if it is not a record."""
    view = memoryview(data).cast("B")
    if view.nbytes < PREFIX_BYTES:
        raise CorruptBlockError(f"record has {view.nbytes} bytes; the fixed prefix alone needs {PREFIX_BYTES}")
    magic, version, _reserved, header_len, block_hash, namespace, payload_len = PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise CorruptBlockError(f"record starts with {bytes(magic)!r}; expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"record format version {version} is not read by this build (it reads version {FORMAT_VERSION} only; "
            "version 1 records carried SHA-256 checksums): the block is dropped and will be recomputed"
        )
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


def parse_meta(prefix: RecordPrefix, header_json: bytes | memoryview) -> TensorMeta:
    """The tensor meta in a record's JSON header; CorruptBlockError if it does not parse or validate."""
    try:
        return TensorMeta.from_json(json.loads(bytes(header_json)))
    except (UnicodeDecodeError, json.JSONDecodeError, CodecError) as exc:
        raise CorruptBlockError(f"record header of block {prefix.block_hash.hex()[:16]} is invalid: {exc}") from None


def verify_parts(
    prefix: RecordPrefix, header: bytes | memoryview, payload: bytes | memoryview, checksum: bytes | memoryview,
    expected_hash: bytes | None, expected_namespace: bytes | None,
) -> None:
    """Raise unless `checksum` is the checksum of header + payload, then unless the names are the expected ones
    (the checksum first: a flipped name byte is corruption, not another tenant's block)."""
    if checksum_of(header, payload) != checksum:
        raise CorruptBlockError(f"checksum mismatch for block {prefix.block_hash.hex()[:16]}")
    check_names(prefix, expected_hash, expected_namespace)


def check_out(meta: TensorMeta, block_hash: bytes, out: torch.Tensor) -> None:
    """Raise ValueError unless `out` has the block's shape and dtype (what a decode into `out` needs)."""
    if tuple(out.shape) != meta.shape or out.dtype != meta.torch_dtype:
        raise ValueError(
            f"block {block_hash.hex()[:16]} is {meta.dtype} {meta.shape}; out is {out.dtype} {tuple(out.shape)}"
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
    header_end = PREFIX_BYTES + prefix.header_len
    checksum = bytes(view[body_end:])
    verify_parts(prefix, view[:header_end], view[header_end:body_end], checksum, expected_hash, expected_namespace)
    meta = parse_meta(prefix, view[PREFIX_BYTES:header_end])
    return BlockRecord(prefix.block_hash, prefix.namespace, meta, view[header_end:body_end],
                       bytes(view[:header_end]), checksum)
