"""The seed's tensor store and the config are bounded and fail early (issue 15, items 3 and 4)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cache.base_cache import BaseKVCache
from ultra_adaptive_kv_cache_engine.cache.keys import MAX_KEY_BYTES
from ultra_adaptive_kv_cache_engine.cache.shared_snapshot import SharedSnapshot
from ultra_adaptive_kv_cache_engine.cache.tensor_file import snapshot_path


def test_one_dimensional_values_are_bounded_in_bytes() -> None:
    cache = BaseKVCache(KVCacheConfig(max_tokens=64, max_store_bytes=3 * 4096, cache_strategy="lru"))
    for i in range(10):  # each 1-D value counts as one token but 4096 bytes
        cache.store(torch.tensor([i]), torch.full((1024,), float(i)))
    assert len(cache) == 3 and cache.num_bytes == 3 * 4096 and cache.num_tokens == 3
    assert [cache.retrieve(torch.tensor([i])) is not None for i in range(10)] == [False] * 7 + [True] * 3
    with pytest.raises(ValueError, match="more than the whole capacity max_store_bytes=12288"):
        cache.store(torch.tensor([99]), torch.zeros(4 * 1024))


def test_a_broadcast_key_is_refused_before_any_copy() -> None:
    cache = BaseKVCache(KVCacheConfig())
    huge = torch.zeros(1).expand(10**9)  # 4 bytes of storage, 4 GB if materialised
    with pytest.raises(ValueError, match=f"keys are at most {MAX_KEY_BYTES} bytes"):
        cache.store(huge, torch.ones(2))
    with pytest.raises(ValueError, match="keys are at most"):
        cache.retrieve(huge)
    assert len(cache) == 0


def test_a_quantized_value_is_refused_and_persist_writes_the_rest(tmp_path: Path) -> None:
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(enable_persistence=True, persistence_path=str(tmp_path)))
    q = torch.quantize_per_tensor(torch.ones(4, 8), 0.1, 0, torch.qint8)
    with pytest.raises(ValueError, match="dtype torch.qint8 .* cannot be stored"):
        engine.store(torch.tensor([1]), q)
    engine.store(torch.tensor([2]), torch.ones(4, 8))
    assert engine.persist()["tensor_entries"] == 1
    fresh = UltraAdaptiveKVCacheEngine(KVCacheConfig(enable_persistence=True, persistence_path=str(tmp_path)))
    fresh.load()
    assert torch.equal(fresh.retrieve(torch.tensor([2])), torch.ones(4, 8))


def test_snapshot_temporaries_of_dead_writers_are_removed_at_open(tmp_path: Path) -> None:
    path = snapshot_path(tmp_path, "")
    dead = path.with_name(f".{path.name}.999999999.tmp")  # no such pid
    alive = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # a writer still running
    dead.write_bytes(b"torn")
    alive.write_bytes(b"in progress")
    SharedSnapshot(tmp_path)
    assert not dead.exists() and alive.exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"max_tokens": 10**12}, "max_tokens=1000000000000 is out of range"),
    ({"max_store_bytes": 0}, "max_store_bytes=0 is out of range"),
    ({"write_through_delay_s": 0}, "write_through_delay_s=0 must be a positive number"),
    ({"tier_read_timeout_s": float("nan")}, "tier_read_timeout_s=nan must be a positive number"),
    ({"tier_secret": "short"}, "tier_secret must be a string of at least 16 bytes"),
])
def test_values_that_could_only_fail_later_fail_at_construction(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        KVCacheConfig(**changes)


def test_a_file_as_persistence_path_fails_at_construction(tmp_path: Path) -> None:
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    for path in (file, file / "below"):
        with pytest.raises(ValueError, match="is a file, not a folder"):
            KVCacheConfig(enable_persistence=True, persistence_path=str(path))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder")
def test_an_unwritable_folder_fails_at_construction(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o500)
    with pytest.raises(ValueError, match="is not writable"):
        KVCacheConfig(enable_persistence=True, persistence_path=str(folder / "blocks"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="no CUDA device is available"):
        KVCacheConfig(device="cuda")


def test_the_secret_is_not_in_the_repr() -> None:
    assert "0123456789abcdef" not in repr(KVCacheConfig(tier_secret="0123456789abcdef"))
