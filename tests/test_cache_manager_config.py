"""The cache manager built from a config: the pool's byte budget, the tier list, per-tier policy and codec."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.budget import DEFAULT_CPU_BYTES, plan_pool
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.cache.tier_list import namespace_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig, TierConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.tiers.recoding import RecodingTier
from ultra_adaptive_kv_cache_engine.types import CodecKind, TierKind

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=3, block_size=4, dtype=torch.float32)  # 384-byte blocks
MiB = 1024**2


def probe(nbytes: int):
    return lambda device: nbytes


# -- the memory budget ---------------------------------------------------------------------------------------
def test_max_memory_sizes_the_pool_in_whole_blocks():
    budget = plan_pool(KVCacheConfig(block_size=4, max_memory=1000), SPEC, probe=probe(10**9))
    assert (budget.num_blocks, budget.pool_bytes, budget.source) == (2, 768, "max_memory")


def test_cpu_default_is_a_quarter_of_available_memory_at_most_512_mib():
    small = plan_pool(KVCacheConfig(block_size=4), SPEC, probe=probe(4 * 3840))
    assert (small.num_blocks, small.budget_bytes, small.source) == (10, 3840, "cpu_default")
    large = plan_pool(KVCacheConfig(block_size=4), SPEC, probe=probe(64 * 1024**3))
    assert (large.budget_bytes, large.num_blocks) == (DEFAULT_CPU_BYTES, DEFAULT_CPU_BYTES // 384)


def test_cuda_takes_the_utilization_share_of_free_device_memory():
    spec = KVSpec(2, 2, 3, 4, dtype=torch.float32, device="cuda")
    config = KVCacheConfig(block_size=4, gpu_memory_utilization=0.5)
    budget = plan_pool(config, spec, probe=probe(384 * 100))
    assert (budget.num_blocks, budget.source) == (50, "gpu_memory_utilization")


def test_a_budget_the_device_cannot_hold_fails_before_allocating_naming_both_sizes():
    with pytest.raises(ValueError, match=r"needs 4096 bytes .*max_memory.* only 1000 bytes .* is available"):
        plan_pool(KVCacheConfig(block_size=4, max_memory=4096), SPEC, probe=probe(1000))
    with pytest.raises(ValueError, match="does not fit one block of 384 bytes"):
        plan_pool(KVCacheConfig(block_size=4, max_memory=383), SPEC, probe=probe(10**9))
    with pytest.raises(ValueError, match=r"the KV pool needs \d+ bytes .* available"):
        KVCacheManager(KVCacheConfig(block_size=4, max_memory=1 << 60), SPEC)  # real probe: no machine has 1 EiB


def test_max_tokens_no_longer_sizes_the_pool():
    # Formerly max_tokens=1<<22 sized the KV pool too and died inside torch.zeros for SmolLM2.
    cache = KVCacheManager(KVCacheConfig(max_tokens=1 << 22, block_size=4, max_memory=MiB), SPEC)
    assert cache.num_blocks == MiB // 384


# -- the tier list ---------------------------------------------------------------------------------------------
def test_legacy_fields_derive_the_tier_list():
    config = KVCacheConfig(cpu_tier_bytes=MiB, enable_persistence=True, disk_tier_bytes=8 * MiB,
                           redis_url="redis://127.0.0.1:1/0")
    assert config.tier_list == (TierConfig("cpu", MiB), TierConfig("disk", 8 * MiB), TierConfig("redis"))
    assert KVCacheConfig(cpu_tier_bytes=0).tier_list == ()


def test_tier_config_errors_name_the_value():
    with pytest.raises(ValueError, match="tier kind='tape' is not valid"):
        TierConfig("tape")
    with pytest.raises(ValueError, match="'device' is the block pool itself"):
        TierConfig("device")
    with pytest.raises(ValueError, match="capacity_bytes=0 is out of range"):
        TierConfig("cpu", 0)
    with pytest.raises(ValueError, match="tiers='cpu' must be a sequence of TierConfig"):
        KVCacheConfig(tiers="cpu")  # type: ignore[arg-type]


def _tiers(config: KVCacheConfig) -> tuple[KVCacheManager, list]:
    cache = KVCacheManager.from_config(config, SPEC, default_namespace(config, SPEC), num_blocks=8)
    assert cache.lower is not None
    return cache, list(cache.lower.store.tiers)


def test_each_tier_gets_its_policy_and_codec(tmp_path):
    config = KVCacheConfig(block_size=4, cache_strategy="s3fifo", persistence_path=str(tmp_path),
                           tiers=(TierConfig("cpu", MiB, policy="fifo"), TierConfig("disk", 8 * MiB, codec="zstd")))
    cache, (cpu, disk) = _tiers(config)
    try:
        assert cpu.kind is TierKind.CPU and type(cpu._policy).__name__ == "FIFOPolicy"
        assert isinstance(disk, RecodingTier) and disk.codec.kind is CodecKind.ZSTD
        assert type(disk.tier._policy).__name__ == "S3FIFOPolicy"  # the strategy's policy, as the pool's
        assert type(cache.policy).__name__ == "S3FIFOPolicy"
        assert namespace_codec(config) == "cpu=identity,disk=zstd" and cache.namespace.codec == namespace_codec(config)
    finally:
        cache.close()


def test_a_block_reaches_the_disk_in_its_codec_and_comes_back_exact(tmp_path):
    config = KVCacheConfig(block_size=4, persistence_path=str(tmp_path),
                           tiers=(TierConfig("cpu", MiB), TierConfig("disk", 8 * MiB, codec="zstd")))
    cache, (cpu, disk) = _tiers(config)
    gen = torch.Generator().manual_seed(3)
    keys = [torch.randn(2, 8, 3, generator=gen) for _ in range(2)]
    values = [torch.randn(2, 8, 3, generator=gen) for _ in range(2)]
    seq = cache.new_sequence(list(range(8)))
    cache.append(seq, list(range(8)), keys, values)
    cache.commit(seq)
    flushed = cache.persist()  # CPU-only blocks are copied to the durable disk tier, re-encoded there
    assert flushed is not None and len(flushed.keys) == 2
    stored = [disk.get(k) for k in flushed.keys]
    assert [r.meta.codec for r in stored] == [CodecKind.ZSTD, CodecKind.ZSTD]
    assert disk.counters.snapshot()["recoded"] == 2
    cache.close()
    other = config.with_(tiers=(TierConfig("disk", 8 * MiB, codec="zstd"),))
    assert namespace_codec(other) == "zstd"  # another tier line-up is another namespace: no block is shared
    fresh, _ = _tiers(config)  # a restart: empty CPU tier, the disk tier warm-starts from the folder
    try:
        again = fresh.new_sequence(list(range(8)))
        assert fresh.num_cached_tokens(again) == 8 and fresh.sequence_hits(again).tier_tokens == 8
        assert torch.equal(fresh.read_layer(again, 1)[0], keys[1])
    finally:
        fresh.close()


def test_a_redis_tier_without_a_url_is_a_clear_error():
    with pytest.raises(ValueError, match="redis tier is listed in tiers but redis_url is not set"):
        _tiers(KVCacheConfig(block_size=4, tiers=(TierConfig("redis"),)))


def test_an_unknown_tier_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="tier cpu: policy='nope' is not a registered policy"):
        _tiers(KVCacheConfig(block_size=4, tiers=(TierConfig("cpu", MiB, policy="nope"),)))
