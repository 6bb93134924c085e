"""KVCacheConfig validation: every bad value names the field, the value and what is allowed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ultra_adaptive_kv_cache_engine import CacheStrategy, KVCacheConfig
from ultra_adaptive_kv_cache_engine.types import CodecKind, DeviceKind, FsyncPolicy, KVDType


def test_defaults_and_normalisation():
    c = KVCacheConfig(cache_strategy="LRU", device="cpu", fsync_policy="always", codec="int8", dtype=torch.float16)
    assert c.cache_strategy is CacheStrategy.LRU
    assert c.device is DeviceKind.CPU and c.fsync_policy is FsyncPolicy.ALWAYS and c.codec is CodecKind.INT8
    assert c.dtype is KVDType.FLOAT16 and c.dtype.torch is torch.float16
    d = KVCacheConfig()
    assert (d.max_tokens, d.cache_strategy, d.block_size, d.enable_persistence) == (
        4096, CacheStrategy.ADAPTIVE, 16, False)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("max_tokens", 0, "max_tokens=0 is out of range; expected an integer >= 1"),
        ("max_tokens", 1.5, "max_tokens=1.5 must be an integer"),
        ("max_tokens", True, "max_tokens=True must be an integer"),
        ("block_size", 4096, "block_size=4096 is out of range"),
        ("cache_strategy", "nope", "cache_strategy='nope' is not a known strategy; expected one of: "),
        ("device", "tpu", "device='tpu' is not valid; expected one of: auto, cpu, cuda"),
        ("fsync_policy", "sometimes", "fsync_policy='sometimes' is not valid; expected one of: always, batch, never"),
        ("dtype", "int3", "dtype='int3' is not supported"),
        ("enable_persistence", "yes", "enable_persistence='yes' must be True or False"),
        ("redis_url", "http://x", "redis_url='http://x' must start with redis://"),
        ("persistence_path", "", "persistence_path='' must be a non-empty string or None"),
        ("max_new_tokens", 0, "max_new_tokens=0 is out of range"),
    ],
)
def test_bad_values_are_named(field, value, match):
    with pytest.raises(ValueError, match=match.replace("(", "\\(").replace(")", "\\)")):
        KVCacheConfig(**{field: value})


def test_frozen_and_with():
    c = KVCacheConfig()
    with pytest.raises(AttributeError):
        c.max_tokens = 5  # type: ignore[misc]
    assert c.with_(max_tokens=5).max_tokens == 5
    with pytest.raises(ValueError, match="unknown config field"):
        c.with_(colour="red")


def test_paths(tmp_path):
    c = KVCacheConfig(persistence_path=tmp_path / "p", model_cache_dir=str(tmp_path / "m"))
    assert c.persistence_dir == tmp_path / "p" and c.model_dir == tmp_path / "m"
    assert isinstance(c.persistence_path, str)


@pytest.mark.parametrize("field", dataclasses.fields(KVCacheConfig), ids=lambda f: f.name)
def test_every_field_has_a_help_text(field):
    # The help text is what `uakv --help`, the README table and `uakv config` show for the field.
    assert isinstance(field.metadata.get("help"), str) and field.metadata["help"].strip(), (
        f"KVCacheConfig.{field.name}: add field(default=..., metadata={{'help': '...'}})")
    assert field.metadata.get("unit", "bytes") == "bytes"
