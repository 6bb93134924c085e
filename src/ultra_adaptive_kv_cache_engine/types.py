"""L0 enums shared by every layer: strategies, dtypes, devices, codecs, tiers, fsync policies.

`CacheStrategy` is extensible at run time, so that both the registry (`register_strategy`) and the seed's
own pattern (``CacheStrategy.CUSTOM = "custom"``) add a real member that `CacheStrategy("custom")` finds;
`CodecKind` likewise, for users' compressors registered as codecs.
"""

from __future__ import annotations

import enum

import torch


class _ExtensibleEnumMeta(enum.EnumMeta):
    """An enum metaclass where assigning a new UPPER_CASE name to a string adds a member.

    Assigning an existing member its own value again (``CacheStrategy.CUSTOM = "custom"`` run twice, or after
    `register_strategy("custom", ...)`) is a no-op; assigning it a different value is an AttributeError that
    names the member and both values.
    """

    def __setattr__(cls, name: str, value: object) -> None:
        member_map = cls.__dict__.get("_member_map_")
        existing = member_map.get(name) if member_map is not None else None
        if existing is not None:  # enum creation sets a member's attribute before adding it to _member_map_
            if isinstance(value, str) and value == existing._value_:
                return
            new = value._value_ if isinstance(value, cls) else value
            raise AttributeError(
                f"{cls.__name__}.{name} is already {existing._value_!r}; cannot reassign it to {new!r}"
            )
        if (
            member_map is not None
            and name.isupper()
            and not name.startswith("_")
            and name not in member_map
            and type(value) is str  # members themselves are str subclasses: leave enum creation alone
        ):
            cls._add_member(name, value)
            return
        super().__setattr__(name, value)

    def _add_member(cls, name: str, value: str) -> None:
        existing = cls._value2member_map_.get(value)
        if existing is not None:  # an alias of an existing member
            cls._member_map_[name] = existing
            type.__setattr__(cls, name, existing)
            return
        member = str.__new__(cls, value)
        member._name_ = name
        member._value_ = value
        member.__objclass__ = cls
        cls._member_map_[name] = member
        cls._member_names_.append(name)
        cls._value2member_map_[value] = member
        type.__setattr__(cls, name, member)


class CacheStrategy(str, enum.Enum, metaclass=_ExtensibleEnumMeta):
    """Eviction strategy of a cache; each value names a policy in `policies.registry`."""

    LRU = "lru"
    LFU = "lfu"
    FIFO = "fifo"
    S3FIFO = "s3fifo"
    ARC = "arc"
    ADAPTIVE = "adaptive"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: object) -> CacheStrategy:
        """The member for `value` (a member or its string value); ValueError naming the valid ones."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            member = cls._value2member_map_.get(value.lower())
            if member is not None:
                return member
        valid = ", ".join(sorted(m.value for m in cls))
        raise ValueError(f"cache_strategy={value!r} is not a known strategy; expected one of: {valid}")


class KVDType(str, enum.Enum):
    """Element type of KV held in the block pool."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"

    @property
    def torch(self) -> torch.dtype:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[self.value]

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float16": 2, "bfloat16": 2}[self.value]

    @classmethod
    def parse(cls, value: object) -> KVDType:
        if isinstance(value, cls):
            return value
        if isinstance(value, torch.dtype):
            for member in cls:
                if member.torch == value:
                    return member
        if isinstance(value, str):
            name = value.removeprefix("torch.").lower()
            if name in cls._value2member_map_:
                return cls(name)
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"dtype={value!r} is not supported; expected one of: {valid}")


class DeviceKind(str, enum.Enum):
    """Where the accelerator pool lives. AUTO picks CUDA when available, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def resolve(self) -> torch.device:
        if self is DeviceKind.AUTO:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.value)


class CodecKind(str, enum.Enum, metaclass=_ExtensibleEnumMeta):
    """How a block is encoded in a tier; extensible like `CacheStrategy` (`compression.register_compressor`)."""

    IDENTITY = "identity"
    FP8 = "fp8"
    INT8 = "int8"
    INT4 = "int4"
    ZSTD = "zstd"


POOL_FORMAT_NAMES: tuple[str, ...] = ("fp8", "int8", "int4", "int2")
"""The quantized pool formats `KVCacheConfig.kv_dtype` accepts: the names of `compression.POOL_FORMATS`."""

LOSSLESS_TIER_CODECS: tuple[str, ...] = ("identity", "zstd")
"""Tier codecs a quantized pool may use: they move its blocks' bytes as they are (see `KVCacheConfig`)."""


class TierKind(str, enum.Enum):
    """The places a block can live, fastest first."""

    DEVICE = "device"
    CPU = "cpu"
    DISK = "disk"
    REDIS = "redis"


class DiskLayout(str, enum.Enum):
    """How a disk tier lays blocks out: one file per block, or an append-only log of segment files."""

    FILES = "files"
    SEGMENTS = "segments"


class TierWrites(str, enum.Enum):
    """When the blocks of the pool go down to the tiers below it.

    THROUGH: every block at its commit (the tiers hold a copy of what the pool holds; a durable tier receives it
    within `write_through_delay_s`). EVICT: a block when the pool evicts it (the tiers hold what the pool let go;
    nothing is copied while the pool has room). AUTO: EVICT when every tier is volatile memory, THROUGH when one
    is durable or shared (disk, Redis): the persistence contract.
    """

    AUTO = "auto"
    THROUGH = "through"
    EVICT = "evict"


class FsyncPolicy(str, enum.Enum):
    """When the disk tier fsyncs, as Redis's appendfsync.

    ALWAYS: every block is fsynced (file and folder) before `put` returns; a crash loses nothing returned.
    BATCH: blocks are fsynced together at `flush()`/`persist()`; a crash loses blocks written since then.
    NEVER: the OS decides; a crash can lose anything not yet written back by the kernel.
    """

    ALWAYS = "always"
    BATCH = "batch"
    NEVER = "never"


class OptimizationGoal(str, enum.Enum):
    """Goals of `advanced_optimization`."""

    LATENCY = "latency"
    MEMORY = "memory"
    THROUGHPUT = "throughput"


def parse_enum(enum_cls: type[enum.Enum], field: str, value: object) -> enum.Enum:
    """`enum_cls(value)` or ValueError naming the field, the value and the allowed values."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(value.lower() if isinstance(value, str) else value)
    except ValueError:
        valid = ", ".join(str(m.value) for m in enum_cls)
        raise ValueError(f"{field}={value!r} is not valid; expected one of: {valid}") from None
