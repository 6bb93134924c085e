"""Quantized pools in the memory and cache layers: storage shapes and bytes, the budget in storage bytes, the
namespace naming the pool format, tiers moving the compressed bytes as they are."""

from __future__ import annotations

import pytest
import torch

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig, TierConfig
from ultra_adaptive_kv_cache_engine.memory import BlockPool, KVSpec

BS = 4


def spec_of(fmt: str | None, block_size: int = BS) -> KVSpec:
    return KVSpec(num_layers=2, num_kv_heads=2, head_dim=16, block_size=block_size, dtype=torch.float16,
                  pool_format=fmt)


def test_a_quantized_spec_describes_storage():
    spec = spec_of("int4", 16)
    # int4: data 16 x 2 x 16 / 2 = 256 bytes, key params 2 x (2 x 16) float16 = 128 bytes: slab 384
    assert spec.slab_bytes == 384 and spec.block_shape == (2, 2, 384) and spec.pool_shape(3) == (3, 2, 2, 384)
    assert spec.storage_dtype is torch.uint8 and spec.dtype is torch.float16 and spec.itemsize == 1
    assert spec.elements_per_block == spec.bytes_per_block == 1536 and spec.bytes_per_token == 96
    assert spec.staging_block_shape == (2, 2, 16, 2, 16) and spec.quant_format.name == "int4"
    plain = spec_of(None, 16)
    assert plain.block_shape == plain.staging_block_shape and plain.bytes_per_block == 4096
    assert plain.storage_dtype is torch.float16 and plain.quant_format is None
    pool = BlockPool(spec, 3)
    assert pool.kv.dtype is torch.uint8 and tuple(pool.kv.shape) == (3, 2, 2, 384)
    with pytest.raises(ValueError, match="slab_bytes is defined for quantized pools only"):
        _ = plain.slab_bytes


def test_a_spec_names_a_bad_format():
    with pytest.raises(ValueError, match="KVSpec.pool_format: unknown pool format 'int3'; expected one of: fp8, int8"):
        spec_of("int3")
    with pytest.raises(ValueError, match="head_dim=6 must be a multiple of 4"):
        KVSpec(1, 1, 6, 4, pool_format="int2")


@pytest.mark.parametrize(("fmt", "blocks"), [(None, 100), ("fp8", 177), ("int8", 177), ("int4", 266), ("int2", 400)])
def test_the_same_budget_holds_more_quantized_blocks(fmt, blocks):
    # float16 blocks of 16 tokens: 4096 bytes; fp8/int8 slabs 576 bytes (2304 per block), int4 384, int2 256
    config = KVCacheConfig(block_size=16, max_memory=4096 * 100, kv_dtype=fmt, cpu_tier_bytes=0)
    cache = KVCacheManager(config, spec_of(fmt, 16))
    assert cache.num_blocks == blocks and cache.budget.bytes_per_block == cache.spec.bytes_per_block
    assert cache.kv.numel() <= 4096 * 100


def test_config_and_spec_must_agree_and_lossy_tier_codecs_are_refused():
    with pytest.raises(ValueError, match="spec.pool_format='int4' must equal config.kv_dtype=None"):
        KVCacheManager(KVCacheConfig(block_size=BS, cpu_tier_bytes=0), spec_of("int4"), num_blocks=4)
    with pytest.raises(ValueError, match="the cpu tier's codec 'int4' is lossy: use one of identity, zstd"):
        KVCacheConfig(kv_dtype="int8", codec="int4")
    with pytest.raises(ValueError, match="the disk tier's codec 'fp8' is lossy"):
        KVCacheConfig(kv_dtype="int8", tiers=(TierConfig("cpu"), TierConfig("disk", codec="fp8")))
    assert KVCacheConfig(kv_dtype="int8", codec="int4", cpu_tier_bytes=0).tier_list == ()  # no tier to refuse


def _manager(fmt: str | None, tmp_path=None, num_blocks: int = 8, **fields) -> KVCacheManager:
    disk = {"enable_persistence": True, "persistence_path": str(tmp_path)} if tmp_path is not None else {}
    config = KVCacheConfig(block_size=BS, kv_dtype=fmt, write_through_delay_s=60.0, **{**disk, **fields})
    return KVCacheManager.from_config(config, spec_of(fmt), _namespace(config, fmt), num_blocks=num_blocks)


def _namespace(config: KVCacheConfig, fmt: str | None):
    from ultra_adaptive_kv_cache_engine.cache.namespaces import default_namespace

    return default_namespace(config, spec_of(fmt))


def _write_sequence(cache: KVCacheManager, tokens: list[int], seed: int) -> torch.Tensor:
    """A committed sequence whose blocks hold random bytes (as sealed slabs would); returns those bytes."""
    seq = cache.new_sequence(tokens)
    cache.append(seq, tokens, None, None)
    table = torch.tensor(cache.block_table(seq))
    content = torch.randint(0, 256, (len(table), *cache.spec.block_shape), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(seed))
    if cache.kv.dtype != torch.uint8:
        content = content.view(cache.kv.dtype)[..., : cache.kv.shape[-1]].clone()  # any bits: only compared
    cache.kv[table] = content
    assert cache.commit(seq) == len(table)
    cache.free(seq)
    return content


def test_the_namespace_names_the_pool_format():
    digests = {fmt: _namespace(KVCacheConfig(block_size=BS, kv_dtype=fmt), fmt) for fmt in (None, "int8", "int4")}
    assert digests["int4"].codec == "pool=int4;identity" and digests[None].codec == "identity"
    assert len({ns.digest for ns in digests.values()}) == 3
    with pytest.raises(ValueError, match="namespace.codec='identity' must start with 'pool=int4;'"):
        KVCacheManager(KVCacheConfig(block_size=BS, kv_dtype="int4"), spec_of("int4"), 4, digests[None])
    with pytest.raises(ValueError, match="must not start with 'pool='"):
        KVCacheManager(KVCacheConfig(block_size=BS), spec_of(None), 4, digests["int4"])


def test_an_int4_block_on_disk_is_no_hit_for_int8_or_full_precision(tmp_path):
    tokens = list(range(100, 112))  # 3 blocks
    writer = _manager("int4", tmp_path, cpu_tier_bytes=0)
    _write_sequence(writer, tokens, seed=1)
    writer.persist()
    writer.close()
    for fmt, expected in ((None, 0), ("int8", 0), ("int4", 12)):
        reader = _manager(fmt, tmp_path, cpu_tier_bytes=0)
        seq = reader.new_sequence(tokens)
        assert reader.num_cached_tokens(seq) == expected, fmt
        reader.free(seq)
        reader.close()


@pytest.mark.parametrize("codec", ["identity", "zstd"])
def test_quantized_blocks_come_back_from_the_cpu_and_disk_tiers_byte_identical(tmp_path, codec):
    tokens = list(range(7, 19))  # 3 blocks
    cache = _manager("int2", tmp_path, num_blocks=4, codec=codec)
    content = _write_sequence(cache, tokens, seed=2)
    _write_sequence(cache, list(range(50, 66)), seed=3)  # 4 blocks: evicts the first sequence from the pool
    cache.persist()
    seq = cache.new_sequence(tokens)
    assert cache.num_cached_tokens(seq) == 12 and cache.sequence_hits(seq).tier_tokens == 12
    assert torch.equal(cache.kv[torch.tensor(cache.block_table(seq))], content)  # from the CPU tier
    assert cache.stats()["tiers"]["children"][0]["counters"]["hits"] >= 3
    cache.free(seq)
    cache.close()
    fresh = _manager("int2", tmp_path, num_blocks=4, codec=codec, cpu_tier_bytes=0)  # the disk tier only
    seq = fresh.new_sequence(tokens)
    assert fresh.num_cached_tokens(seq) == 12
    assert torch.equal(fresh.kv[torch.tensor(fresh.block_table(seq))], content)
    fresh.close()


def test_a_quantized_pool_reserves_instead_of_taking_kv_and_reads_dequantised():
    cache = _manager("int8", num_blocks=4, cpu_tier_bytes=0)
    seq = cache.new_sequence()
    zeros = [torch.zeros((2, 4, 16), dtype=torch.float16)] * 2
    with pytest.raises(ValueError, match="the pool is quantized \\(kv_dtype='int8'\\)"):
        cache.append(seq, [1, 2, 3, 4], zeros, zeros)
    assert cache.block_table(seq) == ()  # nothing changed
    cache.append(seq, [1, 2, 3, 4, 5], None, None)
    table = cache.block_table(seq)
    assert len(table) == 2 and cache.num_kv_tokens(seq) == 5
    x = torch.randn((1, 4, 2, 16))
    fmt = cache.spec.quant_format
    cache.kv[table[0], 1] = torch.stack([fmt.quantize(x, True)[0], fmt.quantize(x, False)[0]])
    assert cache.commit(seq) == 1
    match = cache.lookup([1, 2, 3, 4, 5])
    keys, values = cache.read_prefix(match, 1)
    assert keys.dtype == torch.float16 and tuple(keys.shape) == (2, 4, 16)
    expected = fmt.dequantize(fmt.quantize(x, True), True, 4, 2, 16, torch.float16)[0].transpose(0, 1)
    assert torch.equal(keys, expected)
    with pytest.raises(ValueError, match="only sealed \\(full\\) blocks live in the pool"):
        cache.read_layer(seq, 0)
