"""The tiers below the block pool, built from `config.tier_list` (a list of `TierConfig`, fastest first).

Each tier kind has one entry in `TIER_OPTIONS` mapping the config onto its constructor's options (no branch
per kind). A tier's policy is its own `TierConfig.policy`, else the config's `cache_strategy` (the same policy
classes that decide for the pool); a tier's codec is its own, else the config's `codec`. The first tier's codec
encodes write-through; a tier with another codec re-encodes what it receives (`RecodingTier`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from ..compression import Codec, make_codec
from ..config import KVCacheConfig, TierConfig
from ..metrics import LOGGER_NAME
from ..policies import has_policy
from ..tiers import Tier, make_tier
from ..tiers.recoding import RecodingTier
from ..types import CodecKind, TierKind

logger = logging.getLogger(LOGGER_NAME)

OptionBuilder = Callable[[KVCacheConfig, TierConfig], dict[str, Any]]


def _cpu(config: KVCacheConfig, tier: TierConfig) -> dict[str, Any]:
    return {"capacity_bytes": tier.capacity_bytes, "policy": tier_policy(config, tier)}


def _disk(config: KVCacheConfig, tier: TierConfig) -> dict[str, Any]:
    return {"root": config.persistence_dir, "capacity_bytes": tier.capacity_bytes, "policy": tier_policy(config, tier),
            "fsync": config.fsync_policy, "layout": config.disk_layout}


def _redis(config: KVCacheConfig, tier: TierConfig) -> dict[str, Any]:
    if config.redis_url is None:
        raise ValueError("a redis tier is listed in tiers but redis_url is not set; set redis_url=redis://host:port/db")
    return {"url": config.redis_url, "secret": tier_secret(config), "read_timeout_s": config.tier_read_timeout_s}


def tier_secret(config: KVCacheConfig) -> str | None:
    """The secret of shared tiers: `config.tier_secret`, else $UAKV_TIER_SECRET, else None (a warning)."""
    return config.tier_secret if config.tier_secret is not None else (os.environ.get("UAKV_TIER_SECRET") or None)


TIER_OPTIONS: dict[TierKind, OptionBuilder] = {TierKind.CPU: _cpu, TierKind.DISK: _disk, TierKind.REDIS: _redis}


def tier_policy(config: KVCacheConfig, tier: TierConfig) -> str:
    """The policy name a tier evicts by: its own, else the strategy's when that names a policy, else LRU."""
    name = tier.policy or config.cache_strategy.value
    if has_policy(name):
        return name
    if tier.policy is not None:
        raise ValueError(f"tier {tier.kind.value}: policy={tier.policy!r} is not a registered policy")
    logger.info("strategy %r registers no eviction policy; tier %s evicts by lru", name, tier.kind.value)
    return "lru"


def tier_codecs(config: KVCacheConfig) -> list[CodecKind]:
    """The codec of each tier of `config.tier_list`, in order."""
    return [tier.codec or config.codec for tier in config.tier_list]  # type: ignore[misc]


POOL_PREFIX = "pool="


def pool_codec_prefix(pool_format: str | None) -> str:
    """What a namespace's codec starts with for a pool of `pool_format`: ``pool=<format>;``, or nothing for an
    unquantized pool (so a block quantized one way is never served as another, nor as full precision)."""
    return f"{POOL_PREFIX}{pool_format};" if pool_format is not None else ""


def namespace_codec(config: KVCacheConfig) -> str:
    """The codec part of the block namespace: the pool format of a quantized pool (``pool=int4;``), then the
    one codec, or ``kind=codec`` per tier when they differ."""
    codecs = tier_codecs(config)
    if len(set(codecs)) <= 1:
        tiers = (codecs[0] if codecs else config.codec).value  # type: ignore[union-attr]
    else:
        tiers = ",".join(f"{t.kind.value}={c.value}" for t, c in zip(config.tier_list, codecs, strict=True))
    return pool_codec_prefix(config.kv_dtype) + tiers


def build_tiers(config: KVCacheConfig, namespace_digest: bytes) -> tuple[list[Tier], Codec | None]:
    """The tiers of `config.tier_list` under `namespace_digest`, fastest first, and the write-through codec
    (None when there are no tiers)."""
    specs, codecs = config.tier_list, tier_codecs(config)
    if not specs:
        return [], None
    write_codec = make_codec(codecs[0])
    tiers: list[Tier] = []
    for spec, codec in zip(specs, codecs, strict=True):
        builder = TIER_OPTIONS.get(spec.kind)
        if builder is None:
            raise ValueError(f"tier kind {spec.kind.value!r} cannot be built; expected one of: "
                             f"{', '.join(k.value for k in TIER_OPTIONS)}")
        tier = make_tier(spec.kind, namespace_digest, **builder(config, spec))
        tiers.append(tier if codec == codecs[0] else RecodingTier(tier, make_codec(codec)))
    return tiers, write_codec
