"""Tensor-parallel parts in one process: the group at degree 1, the launcher on tiny real processes, the
sharded block store over a real disk tier, and the input checks."""

from __future__ import annotations

import json
import signal
import sys

import pytest
import torch
from model_fixtures import baseline_generate, make_paged, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.cache.sharded_blocks import FetchResult, ShardedBlockStore
from ultra_adaptive_kv_cache_engine.cache.sharded_group import RankFailureError, ShardGroup
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.generation import generate_with_prefix_cache
from ultra_adaptive_kv_cache_engine.model.loaded import kv_shape_of
from ultra_adaptive_kv_cache_engine.model.parallel.launcher import EXIT_GROUP_BROKE, RankLauncher, _root_cause
from ultra_adaptive_kv_cache_engine.model.parallel.loading import _check_shardable
from ultra_adaptive_kv_cache_engine.model.parallel.prompt_job import PromptJob
from ultra_adaptive_kv_cache_engine.model.parallel.runner import ShardedRunner
from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama
from ultra_adaptive_kv_cache_engine.prefix import hash_blocks
from ultra_adaptive_kv_cache_engine.tiers import DiskTier


@pytest.fixture(scope="module")
def tiny_lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


# -- the group -------------------------------------------------------------------------------------------
def test_head_ranges_are_contiguous_slices_in_rank_order():
    assert [ShardGroup(r, 2).kv_head_range(4) for r in range(2)] == [range(0, 2), range(2, 4)]
    assert [ShardGroup(r, 4).kv_head_range(8) for r in range(4)] == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert ShardGroup.single().kv_head_range(3) == range(0, 3)
    with pytest.raises(ValueError, match="3 KV heads cannot be split over a tensor-parallel degree of 2"):
        ShardGroup(0, 2).kv_head_range(3)


@pytest.mark.parametrize(("rank", "degree"), [(2, 2), (-1, 2), (0, 0)])
def test_group_rejects_a_rank_outside_the_degree(rank, degree):
    with pytest.raises(ValueError, match="need 0 <= rank < degree"):
        ShardGroup(rank, degree)


def test_degree_one_collectives_are_local(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    group = ShardGroup.from_environment("cpu")
    assert group == ShardGroup.single()
    assert group.broadcast_ints([3, 1, 4]) == (3, 1, 4)
    block = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(group.gather_to_first(block)[0], block)
    out = group.scatter_from_first([block], (2, 3), torch.float32, torch.device("cpu"))
    assert torch.equal(out, block) and out.data_ptr() != block.data_ptr()
    group.check_agree(b"anything", "a payload")  # nothing to disagree with
    with pytest.raises(ValueError, match="no backend"):
        ShardGroup.from_environment("tpu")


def test_only_rank_zero_passes_values_to_a_broadcast():
    with pytest.raises(ValueError, match="rank 1: values must be given on rank 0 only"):
        ShardGroup(1, 2).broadcast_ints([1])
    with pytest.raises(ValueError, match="rank 0: values must be given on rank 0 only"):
        ShardGroup(0, 2).broadcast_ints(None)


# -- the model's side ------------------------------------------------------------------------------------
def test_kv_shape_of_a_sharded_model_is_its_slice():
    lm = build_tiny_llama()
    assert kv_shape_of(lm.model).num_kv_heads == 2
    lm.model._tp_size = 2  # what transformers' TP loading sets
    assert kv_shape_of(lm.model).num_kv_heads == 1
    lm.model._tp_size = 4
    with pytest.raises(ValueError, match="2 KV heads, which a tensor-parallel degree of 4 does not divide"):
        kv_shape_of(lm.model)


def test_an_architecture_must_have_a_plan_and_divisible_heads(tmp_path):
    from transformers import LlamaConfig, PretrainedConfig

    _check_shardable(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), tmp_path, 2)
    with pytest.raises(ValueError, match="has 4 attention heads and 2 KV heads; a tensor-parallel degree of 4"):
        _check_shardable(LlamaConfig(num_attention_heads=4, num_key_value_heads=2), tmp_path, 4)
    with pytest.raises(ValueError, match="has no tensor-parallel plan"):
        _check_shardable(PretrainedConfig(), tmp_path, 2)


def test_prompt_job_round_trips_and_checks_its_fields():
    job = PromptJob(config={"model_path": "m", "block_size": 4}, prompts=[[1, 2], [3]], tokenizer="bytes")
    assert PromptJob.from_json(job.to_json()) == job and job.prompts == ((1, 2), (3,))
    assert json.loads(job.to_json())["prompts"] == [[1, 2], [3]]
    with pytest.raises(ValueError, match="tokenizer='nope' is unknown; expected one of: folder, bytes"):
        PromptJob(config={"model_path": "m"}, prompts=[[1]], tokenizer="nope")
    with pytest.raises(ValueError, match="non-empty list"):
        PromptJob(config={"model_path": "m"}, prompts=[[]])
    with pytest.raises(ValueError, match="model_path"):
        PromptJob(config={}, prompts=[[1]])


# -- the launcher ----------------------------------------------------------------------------------------
def _python(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, time\nrank = int(os.environ['RANK'])\n" + code]


def test_launcher_gives_each_rank_its_environment(tmp_path):
    launcher = RankLauncher(3, _python("print(rank, os.environ['WORLD_SIZE'], os.environ['MASTER_ADDR'])"),
                            log_dir=tmp_path)
    launcher.start()
    result = launcher.wait(60)
    assert result.ok and result.returncodes == (0, 0, 0) and result.stopped_ranks == ()
    assert [(tmp_path / f"rank{r}.out").read_text() for r in range(3)] == [f"{r} 3 127.0.0.1\n" for r in range(3)]


def test_a_failed_rank_stops_the_group_after_the_grace_period(tmp_path):
    launcher = RankLauncher(2, _python("sys.exit(7) if rank == 1 else time.sleep(60)"), grace_s=0.2)
    launcher.start()
    result = launcher.wait(60)
    assert (result.first_failed_rank, result.returncodes, result.stopped_ranks) == (1, (-signal.SIGTERM, 7), (0,))
    assert not result.ok and not result.timed_out
    assert result.describe().startswith("tensor-parallel group stopped: rank 1 exited with code 7")


def test_a_launch_past_its_timeout_is_stopped_not_waited_for():
    launcher = RankLauncher(2, _python("time.sleep(60)"), grace_s=0.0)
    launcher.start()
    result = launcher.wait(0.3)
    assert result.timed_out and result.stopped_ranks == (0, 1) and result.first_failed_rank is None


def test_the_root_cause_is_the_rank_that_did_not_merely_follow():
    assert _root_cause([EXIT_GROUP_BROKE, -9]) == 1
    assert _root_cause([EXIT_GROUP_BROKE, None]) == 0
    assert _root_cause([0, None]) is None


# -- the sharded block store at degree 1, over a real disk tier ------------------------------------------
def _disk_config(tmp_path) -> KVCacheConfig:
    return KVCacheConfig(block_size=4, max_memory=1 << 20, cpu_tier_bytes=0, enable_persistence=True,
                         persistence_path=str(tmp_path), device="cpu")


def test_published_records_are_whole_blocks_and_fetch_restores_them(tiny_lm, tmp_path):
    config = _disk_config(tmp_path)
    source = make_paged(tiny_lm, block_size=4)
    prompt = random_ids(22, seed=11)
    generate_with_prefix_cache(tiny_lm.model, source, [prompt], max_new_tokens=6, do_sample=False)
    writer = ShardedBlockStore(source, ShardGroup.single(), LowerTiers.from_config(config, source.namespace.digest))
    published = writer.publish(prompt)
    assert (published.candidate_blocks, published.queued_blocks) == (5, 5)
    assert writer.persist() == 5
    writer.close()
    hashes = hash_blocks(prompt, source.namespace, 4)
    disk = DiskTier(source.namespace.digest, tmp_path, 1 << 30)
    match = source.lookup(prompt)
    for block_hash, block_id in zip(hashes, match.block_ids, strict=True):
        record = disk.get(block_hash)
        assert record is not None and record.meta.shape == (2, 2, 4, 2, 16)  # layers, K/V, tokens, ALL heads, dim
        assert torch.equal(record.tensor(), source.pool.block(block_id))
    reader = make_paged(tiny_lm, block_size=4)
    store = ShardedBlockStore(reader, ShardGroup.single(), LowerTiers.from_config(config, reader.namespace.digest))
    assert store.fetch(prompt) == FetchResult(local_blocks=0, loaded_blocks=5)
    assert store.fetch(prompt) == FetchResult(local_blocks=5, loaded_blocks=0)  # now in the pool
    assert store.agreed_block_table(prompt) == reader.lookup(prompt).block_ids
    for layer in range(2):
        seq_source, seq_reader = source.new_sequence(prompt[:20]), reader.new_sequence(prompt[:20])
        for a, b in zip(source.read_layer(seq_source, layer), reader.read_layer(seq_reader, layer), strict=True):
            assert torch.equal(a, b)
        source.free(seq_source)
        reader.free(seq_reader)
    store.close()


def test_store_checks_who_holds_the_tiers(tiny_lm, tmp_path):
    config = _disk_config(tmp_path)
    paged = make_paged(tiny_lm, block_size=4)
    lower = LowerTiers.from_config(config, paged.namespace.digest)
    with pytest.raises(ValueError, match="rank 1 must not hold tiers"):
        ShardedBlockStore(paged, ShardGroup(1, 2), lower)
    other = LowerTiers.from_config(config, b"\x01" * 32)
    with pytest.raises(ValueError, match="tier namespace 0101"):
        ShardedBlockStore(paged, ShardGroup.single(), other)
    owning = KVCacheManager(config, paged.spec, num_blocks=8, namespace=paged.namespace, lower=lower)
    with pytest.raises(ValueError, match="paged has tiers of its own"):
        ShardedBlockStore(owning, ShardGroup.single(), None)
    for tiers in (lower, other):
        tiers.close()


def test_without_tiers_nothing_is_fetched_or_published(tiny_lm):
    paged = make_paged(tiny_lm, block_size=4)
    store = ShardedBlockStore(paged, ShardGroup.single(), None)
    prompt = random_ids(13, seed=12)
    assert (store.fetch(prompt).loaded_blocks, store.publish(prompt).queued_blocks, store.persist()) == (0, 0, 0)


def test_guard_turns_transport_errors_into_rank_failures_and_passes_others_through():
    group = ShardGroup(0, 2)
    with pytest.raises(RankFailureError, match=r"group of 2 ranks broke during a step on rank 0: \[gloo\] Connection"):
        with group.guard("a step"):
            raise RuntimeError("[gloo] Connection closed by peer\nmore detail")
    with pytest.raises(RuntimeError, match="^a model bug$") as info:
        with group.guard("a step"):
            raise RuntimeError("a model bug")
    assert not isinstance(info.value, RankFailureError)


# -- the runner at degree 1, in this process ---------------------------------------------------------------
def test_runner_leads_a_greedy_request_at_degree_one(tiny_lm):
    config = KVCacheConfig(block_size=4, max_memory=1 << 20, cpu_tier_bytes=0, device="cpu")
    runner = ShardedRunner(tiny_lm, ShardGroup.single(), config)
    prompt = random_ids(22, seed=13)
    result, persisted = runner.lead(prompt, 6, persist=True)
    assert result.output_ids == baseline_generate(tiny_lm, prompt, 6)[0].tolist() and persisted == 0
    again, _ = runner.lead(prompt, 6)
    assert (again.local_blocks, again.fetched_blocks, again.generation.cached_tokens) == (5, 0, 20)
    assert again.block_table == result.block_table == tuple(range(6))  # 22 + 6 - 1 tokens with KV
    with pytest.raises(ValueError, match="max_new_tokens >= 1"):
        runner.lead(prompt, 0)
    with pytest.raises(ValueError, match="rank 0: values must be given on rank 0 only"):
        runner.follow()
    runner.close()
