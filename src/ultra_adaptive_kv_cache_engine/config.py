"""`KVCacheConfig`: the one place where defaults live. Frozen, typed, validated at construction.

Every bad value raises `ValueError` naming the field, the value and what is allowed. Strings given for enum
fields are normalised to their enum member at construction; derived values are properties, never stored.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .types import (
    LOSSLESS_TIER_CODECS,
    POOL_FORMAT_NAMES,
    CacheStrategy,
    CodecKind,
    DeviceKind,
    DiskLayout,
    FsyncPolicy,
    KVDType,
    TierKind,
    TierWrites,
    parse_enum,
)

MAX_BLOCK_SIZE = 1024
MAX_STORE_TOKENS = 1 << 32
"""`max_tokens` at most: the tensor store counts tokens in Python ints, but a larger bound is a typo."""
MIN_SECRET_BYTES = 16
_TRUE = {"1", "true", "yes", "on"}
SCHEMES = ("redis", "rediss", "unix")


def parse_redis_url(url: object) -> tuple[str, bool]:
    """(url for redis-py without its `cluster` query parameter, whether it asked for cluster mode); ValueError
    naming what is wrong for a URL that can only fail later (no host, a port out of range, no socket path)."""
    if not isinstance(url, str) or urlsplit(url).scheme not in SCHEMES or "://" not in url:
        raise ValueError(f"redis_url={url!r} must start with redis://, rediss:// or unix:// (e.g. "
                         "redis://127.0.0.1:6379/0 or unix:///run/redis.sock)")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"redis_url={url!r}: the port must be an integer in 1..65535") from None
    if parts.scheme == "unix":
        if not parts.path or parts.path == "/":
            raise ValueError(f"redis_url={url!r}: unix:// needs a socket path, e.g. unix:///run/redis.sock")
    elif not parts.hostname:
        raise ValueError(f"redis_url={url!r} names no host; expected e.g. redis://127.0.0.1:6379/0")
    elif port == 0:
        raise ValueError(f"redis_url={url!r}: the port must be an integer in 1..65535")
    query = parse_qsl(parts.query, keep_blank_values=True)
    cluster = any(v.lower() in _TRUE for k, v in query if k == "cluster")
    if cluster and parts.scheme == "unix":
        raise ValueError(f"redis_url={url!r}: a Redis Cluster is reached over TCP, not a unix socket")
    rest = urlencode([(k, v) for k, v in query if k != "cluster"])
    base = url.split("?", 1)[0].split("#", 1)[0]
    return (f"{base}?{rest}" if rest else base), cluster


def default_cache_root() -> Path:
    """The user cache folder: $UAKV_CACHE_DIR, else $XDG_CACHE_HOME/ultra-adaptive-kv-cache, else ~/.cache/..."""
    explicit = os.environ.get("UAKV_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ultra-adaptive-kv-cache"


def _require_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        upper = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"{name}={value!r} is out of range; expected an integer >= {minimum}{upper}")


def _require_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise ValueError(f"{name}={value!r} must be a positive number of seconds")


def _require_writable_folder(name: str, folder: Path) -> None:
    """ValueError unless `folder` is, or can be created as, a folder this process can write into."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}={os.fspath(folder)!r}: {os.fspath(probe)!r} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK) or not _statvfs_writable(probe):
        raise ValueError(f"{name}={os.fspath(folder)!r}: folder {os.fspath(probe)!r} is not writable")


def _statvfs_writable(folder: Path) -> bool:
    try:
        return not os.statvfs(folder).f_flag & os.ST_RDONLY
    except OSError:
        return False


def _require_cuda() -> None:
    import torch  # only when CUDA is asked for: the config stays cheap to build

    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")


def _require_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")


def _require_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name}={value!r} must be a number in (0, 1]")


def _require_optional_str(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, str | os.PathLike) or not str(value)):
        raise ValueError(f"{name}={value!r} must be a non-empty string or None")


@dataclass(frozen=True)
class TierConfig:
    """One tier below the block pool: its kind, byte capacity, eviction policy and codec.

    `policy` None means the config's `cache_strategy`; `codec` None means the config's `codec`. `capacity_bytes`
    is ignored by the Redis tier (the server bounds itself). Tiers are listed fastest first.
    """

    kind: TierKind | str
    capacity_bytes: int = 512 * 1024**2
    policy: str | None = None
    codec: CodecKind | str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", parse_enum(TierKind, "tier kind", self.kind))
        if self.kind is TierKind.DEVICE:
            raise ValueError("tier kind 'device' is the block pool itself; list only the tiers below it "
                             f"({', '.join(k.value for k in TierKind if k is not TierKind.DEVICE)})")
        _require_int("capacity_bytes", self.capacity_bytes, 1)
        if self.policy is not None:
            if not isinstance(self.policy, str) or not self.policy:
                raise ValueError(f"tier policy={self.policy!r} must be a policy name or None")
            object.__setattr__(self, "policy", self.policy.lower())
        if self.codec is not None:
            object.__setattr__(self, "codec", parse_enum(CodecKind, "codec", self.codec))


@dataclass(frozen=True)
class KVCacheConfig:
    """Configuration of a cache and its engine.

    Seed fields: `max_tokens` (capacity of the seed's tensor store, in tokens), `cache_strategy`,
    `enable_persistence`, `persistence_path`, `enable_profiling`.

    The KV block pool is sized in bytes, never by `max_tokens`: `max_memory` bytes when given, else on CUDA
    `gpu_memory_utilization` of the free device memory, else (CPU) a quarter of the available memory, at most
    512 MiB (`cache/budget.py`). `tiers` lists the tiers below the pool; None derives them from `cpu_tier_bytes`,
    `enable_persistence` (+ `disk_tier_bytes`) and `redis_url`.

    Every field carries `metadata["help"]` (and `"unit": "bytes"` for byte sizes): `config_sources` derives
    from them the `uakv` options, the `UAKV_*` environment variables and the TOML keys. A new field needs
    its help text (a test fails without one).
    """

    max_tokens: int = field(default=4096, metadata={
        "help": "capacity of the seed's tensor store (store/retrieve), in tokens; never sizes the KV pool"})
    cache_strategy: CacheStrategy | str = field(default=CacheStrategy.ADAPTIVE, metadata={
        "help": "eviction policy of every tier: lru, lfu, fifo, s3fifo, arc, adaptive or a registered one"})
    enable_persistence: bool = field(default=False, metadata={
        "help": "a durable disk tier under persistence_path; enables persist() and load()"})
    persistence_path: str | None = field(default=None, metadata={
        "help": "folder of the disk tier and the tensor-store snapshot (none: <cache root>/blocks)"})
    enable_profiling: bool = field(default=False, metadata={
        "help": "record per-operation latencies (get_profiling_data())"})
    max_store_bytes: int = field(default=1024**3, metadata={
        "help": "bytes the seed's tensor store holds at most (values' storage), besides max_tokens", "unit": "bytes"})
    # Core: blocks and the accelerator pool.
    block_size: int = field(default=16, metadata={
        "help": "tokens per KV block (1 to 1024)"})
    dtype: KVDType | str | None = field(default=None, metadata={
        "help": "KV dtype in the pool: float32, float16 or bfloat16 (none: the model's own)"})
    kv_dtype: str | None = field(default=None, metadata={
        "help": "precision of KV blocks in the pool: none keeps dtype; fp8, int8, int4 or int2 quantizes sealed "
                "blocks (int4/int2 KIVI-style: keys per channel, values per token; a sequence's last, unfilled "
                "block stays in full precision); tier codecs must then be lossless (identity or zstd)"})
    kv_residual_tokens: int | None = field(default=None, metadata={
        "help": "with kv_dtype: each sequence keeps reading its last this many tokens' blocks in full precision "
                "(KIVI's residual window; blocks are still sealed, named and shared quantized); 0: only the "
                "unfilled last block; none: the format's own (256 for int2, 128 for the others)"})
    kv_press: str | None = field(default=None, metadata={
        "help": "token eviction at the end of each prompt's prefill (paged_llama backend): none, or NAME:BUDGET"
                "[,PARAM=VALUE...] with NAME sinks_window, snapkv or keys_norm and BUDGET a ratio (snapkv:0.5) or "
                "tokens (sinks_window:tokens=512); pressed blocks are cached under a namespace of their own"})
    device: DeviceKind | str = field(default=DeviceKind.AUTO, metadata={
        "help": "where the pool and the model live: auto (CUDA when present), cpu or cuda"})
    reject_non_finite: bool = field(default=True, metadata={
        "help": "refuse tensors and KV holding NaN or Inf"})
    tenant_salt: str = field(default="", metadata={
        "help": "per-tenant salt in every block name: tenants never see each other's blocks"})
    # Tiers below the pool (bytes; 0 disables a tier).
    cpu_tier_bytes: int = field(default=512 * 1024**2, metadata={
        "help": "bytes of the CPU tier below the pool (0 disables it)", "unit": "bytes"})
    disk_tier_bytes: int = field(default=4 * 1024**3, metadata={
        "help": "bytes of the disk tier (present when enable_persistence)", "unit": "bytes"})
    redis_url: str | None = field(default=None, metadata={
        "help": "a shared Redis/Valkey tier: redis://host:port/db (?cluster=true for a cluster), rediss:// or "
                "unix://"})
    tier_secret: str | None = field(default=None, repr=False, metadata={
        "help": "secret (16+ bytes) that names and authenticates blocks in shared tiers (redis); none: "
                "$UAKV_TIER_SECRET, else unauthenticated with a warning", "secret": True})
    tier_read_timeout_s: float = field(default=0.5, metadata={
        "help": "deadline of one read from a shared tier on the request path, in seconds (then: a miss)"})
    write_through_delay_s: float = field(default=0.5, metadata={
        "help": "seconds within which a committed block reaches every durable or shared tier (disk, redis)"})
    tier_writes: TierWrites | str = field(default=TierWrites.AUTO, metadata={
        "help": "when pool blocks go down to the tiers: through (at commit), evict (when the pool evicts them) or "
                "auto (evict when every tier is memory, through when one is durable or shared)"})
    fsync_policy: FsyncPolicy | str = field(default=FsyncPolicy.BATCH, metadata={
        "help": "when the disk tier fsyncs: always (every block), batch (at persist()), never (the OS decides)"})
    disk_layout: DiskLayout | str = field(default=DiskLayout.FILES, metadata={
        "help": "files (one file per block) or segments (an append-only log of segment files, compacted)"})
    codec: CodecKind | str = field(default=CodecKind.IDENTITY, metadata={
        "help": "how blocks are encoded in the tiers: identity, fp8, int8, int4 or zstd"})
    tiers: tuple[TierConfig, ...] | None = field(default=None, metadata={
        "help": "the tiers below the pool, fastest first: KIND[:CAPACITY[:POLICY[:CODEC]]],... (none: derived "
                "from cpu_tier_bytes, enable_persistence and redis_url)"})
    # Memory budget of the KV block pool (bytes).
    max_memory: int | None = field(default=None, metadata={
        "help": "bytes of the KV block pool (none: on CUDA gpu_memory_utilization of the free device memory, "
                "else a quarter of the available RAM, at most 512 MiB)", "unit": "bytes"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "fraction of the free CUDA memory given to the KV pool when max_memory is none, in (0, 1]"})
    # Adaptive controllers on the live path (each can be switched off).
    enable_optimizer: bool = field(default=True, metadata={
        "help": "compute or load per request, from measured tier bandwidths and prefill costs"})
    enable_prefetcher: bool = field(default=True, metadata={
        "help": "promote the predicted next turns into the fastest tier"})
    enable_autoscaler: bool = field(default=False, metadata={
        "help": "resize tier capacities from hit-rate curves and memory pressure (off by default: on one "
                "workload it gives memory back at the cost of hits, see bench_controllers)"})
    enable_metrics: bool = field(default=True, metadata={
        "help": "Prometheus metrics through prometheus-client"})
    controller_interval_s: float = field(default=1.0, metadata={
        "help": "seconds between two rounds of the prefetcher and the autoscaler, in a background thread"})
    shadow_fraction: float = field(default=0.0, metadata={
        "help": "share of requests served with cached tokens whose cached KV is recomputed in the background and "
                "compared (a mismatch is counted, logged and evicted from the pool and every tier), in [0, 1]"})
    # Scheduler (continuous batching).
    max_running: int = field(default=64, metadata={
        "help": "requests in the running batch at once (decoding or prefilling)"})
    max_step_tokens: int = field(default=2048, metadata={
        "help": "tokens one scheduler step computes: one per decoding request plus prefill chunks"})
    max_waiting: int = field(default=1024, metadata={
        "help": "requests waiting for admission; one more is refused (HTTP 429)"})
    model_backend: str | None = field(default=None, metadata={
        "help": "model backend: paged_llama (our paged Llama forward) or hf_generate (transformers' generate); none: the "
                "first that supports the model"})
    cuda_graphs: bool = field(default=True, metadata={
        "help": "replay decode steps from CUDA graphs on CUDA"})
    # Model.
    model_path: str | None = field(default=None, metadata={
        "help": "a local Hugging Face folder, .safetensors or .gguf file (none: the embedded "
                "SmolLM2-135M-Instruct)"})
    model_cache_dir: str | None = field(default=None, metadata={
        "help": "where converted model weights are kept (none: <cache root>/models)"})
    max_new_tokens: int = field(default=64, metadata={
        "help": "tokens generated per request unless the request says otherwise"})

    def __post_init__(self) -> None:
        _require_int("max_tokens", self.max_tokens, 1, MAX_STORE_TOKENS)
        _require_int("max_store_bytes", self.max_store_bytes, 1)
        for name in ("tier_read_timeout_s", "write_through_delay_s"):
            _require_seconds(name, getattr(self, name))
        if self.tier_secret is not None and (not isinstance(self.tier_secret, str)
                                             or len(self.tier_secret.encode()) < MIN_SECRET_BYTES):
            raise ValueError(f"tier_secret must be a string of at least {MIN_SECRET_BYTES} bytes (got "
                             f"{type(self.tier_secret).__name__} of length {len(str(self.tier_secret))})")
        _require_int("block_size", self.block_size, 1, MAX_BLOCK_SIZE)
        _require_int("cpu_tier_bytes", self.cpu_tier_bytes, 0)
        if self.kv_residual_tokens is not None:
            _require_int("kv_residual_tokens", self.kv_residual_tokens, 0, 1 << 20)
        _require_int("disk_tier_bytes", self.disk_tier_bytes, 0)
        _require_int("max_new_tokens", self.max_new_tokens, 1, 1 << 20)
        for name in ("max_running", "max_step_tokens", "max_waiting"):
            _require_int(name, getattr(self, name), 1)
        _require_optional_str("model_backend", self.model_backend)
        if self.max_memory is not None:
            _require_int("max_memory", self.max_memory, 1)
        _require_fraction("gpu_memory_utilization", self.gpu_memory_utilization)
        interval = self.controller_interval_s
        if isinstance(interval, bool) or not isinstance(interval, int | float) or not 0 < interval < float("inf"):
            raise ValueError(f"controller_interval_s={interval!r} must be a positive number of seconds")
        shadow = self.shadow_fraction
        if isinstance(shadow, bool) or not isinstance(shadow, int | float) or not 0.0 <= float(shadow) <= 1.0:
            raise ValueError(f"shadow_fraction={shadow!r} must be a number in [0, 1]")
        for name in ("enable_persistence", "enable_profiling", "reject_non_finite", "enable_optimizer",
                     "enable_prefetcher", "enable_autoscaler", "enable_metrics", "cuda_graphs"):
            _require_bool(name, getattr(self, name))
        for name in ("persistence_path", "redis_url", "model_path", "model_cache_dir"):
            _require_optional_str(name, getattr(self, name))
        if not isinstance(self.tenant_salt, str):
            raise ValueError(f"tenant_salt={self.tenant_salt!r} must be a string")
        if self.redis_url is not None:
            parse_redis_url(self.redis_url)
        set_ = object.__setattr__  # normalising the given value, not deriving a new one
        set_(self, "cache_strategy", CacheStrategy.parse(self.cache_strategy))
        set_(self, "device", parse_enum(DeviceKind, "device", self.device))
        set_(self, "fsync_policy", parse_enum(FsyncPolicy, "fsync_policy", self.fsync_policy))
        set_(self, "tier_writes", parse_enum(TierWrites, "tier_writes", self.tier_writes))
        set_(self, "disk_layout", parse_enum(DiskLayout, "disk_layout", self.disk_layout))
        set_(self, "codec", parse_enum(CodecKind, "codec", self.codec))
        if self.dtype is not None:
            set_(self, "dtype", KVDType.parse(self.dtype))
        if self.kv_dtype is not None:
            if not isinstance(self.kv_dtype, str) or self.kv_dtype.lower() not in POOL_FORMAT_NAMES:
                raise ValueError(f"kv_dtype={self.kv_dtype!r} is not a pool format; expected none or one of: "
                                 f"{', '.join(POOL_FORMAT_NAMES)}")
            set_(self, "kv_dtype", self.kv_dtype.lower())
        if self.kv_press is not None:  # the press registry (compression, L1) parses it: parse_press
            if not isinstance(self.kv_press, str):
                raise ValueError(f"kv_press={self.kv_press!r} must be a string such as 'snapkv:0.5' or None")
            if self.kv_press.strip().lower() in ("", "none"):
                set_(self, "kv_press", None)
        if self.tiers is not None:
            if isinstance(self.tiers, str | bytes) or not all(isinstance(t, TierConfig) for t in self.tiers):
                raise ValueError(f"tiers={self.tiers!r} must be a sequence of TierConfig or None")
            set_(self, "tiers", tuple(self.tiers))
        for name in ("persistence_path", "model_path", "model_cache_dir"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, os.fspath(value))
        if self.kv_dtype is not None:
            self._require_lossless_tiers()
        if self.enable_persistence:
            _require_writable_folder("persistence_path", self.persistence_dir)
        if self.device is DeviceKind.CUDA:
            _require_cuda()

    def _require_lossless_tiers(self) -> None:
        """A quantized pool's blocks go to the tiers as their bytes (never decompressed and recompressed): a
        lossy tier codec (which re-quantizes float KV) cannot take them."""
        for tier in self.tier_list:
            codec = tier.codec or self.codec
            if codec.value not in LOSSLESS_TIER_CODECS:  # type: ignore[union-attr]
                raise ValueError(
                    f"kv_dtype={self.kv_dtype!r} quantizes the pool and moves its blocks to the tiers as they are; "
                    f"the {tier.kind.value} tier's codec {codec.value!r} is lossy: use one of "  # type: ignore[union-attr]
                    f"{', '.join(LOSSLESS_TIER_CODECS)} (set codec, or the tier's own codec)")

    @property
    def persistence_dir(self) -> Path:
        """Folder of the durable disk tier."""
        if self.persistence_path is not None:
            return Path(self.persistence_path)
        return default_cache_root() / "blocks"

    @property
    def tier_list(self) -> tuple[TierConfig, ...]:
        """The tiers below the pool, fastest first: `tiers` as given, else derived from the legacy fields."""
        if self.tiers is not None:
            return self.tiers
        derived: list[TierConfig] = []
        if self.cpu_tier_bytes > 0:
            derived.append(TierConfig(TierKind.CPU, self.cpu_tier_bytes))
        if self.enable_persistence:
            derived.append(TierConfig(TierKind.DISK, self.disk_tier_bytes))
        if self.redis_url is not None:
            derived.append(TierConfig(TierKind.REDIS))
        return tuple(derived)

    @property
    def model_dir(self) -> Path:
        """Folder where converted model weights are kept."""
        if self.model_cache_dir is not None:
            return Path(self.model_cache_dir)
        return default_cache_root() / "models"

    def with_(self, **changes: Any) -> KVCacheConfig:
        """A copy with `changes` applied (and validated)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown config field(s) {unknown}; expected some of: {', '.join(sorted(known))}")
        return replace(self, **changes)
