"""Tensor parallelism with real processes on CPU (gloo): the tiny Llama sharded by transformers' TP plan over
two ranks, against degree 1 in this process, over one real disk tier.

The story (module fixture, run once): degree 1 (this process, the ordinary `KVCacheManager` with its tiers)
answers prompt A and persists. Two ranks at degree 2 answer A (a hit on what degree 1 wrote), B (a miss),
B again (a pool hit), persisting after each, and go on with more prompts until rank 1 is killed (SIGKILL)
once it has answered the three: rank 0 must stop on its own with a clear error. Degree 1, restarted here,
then answers B: a hit on what degree 2 wrote and persisted before the failure.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from model_fixtures import baseline_generate, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.cache.sharded_group import ShardGroup
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.generation import GenerationResult, generate_with_prefix_cache
from ultra_adaptive_kv_cache_engine.model.parallel.launcher import EXIT_GROUP_BROKE, RankLauncher
from ultra_adaptive_kv_cache_engine.model.parallel.loading import load_sharded_model
from ultra_adaptive_kv_cache_engine.model.parallel.prompt_job import PromptJob
from ultra_adaptive_kv_cache_engine.model.text import ByteTextCodec

NEW = 8
BOUND_S = 180  # a launch that takes longer is stopped and fails the test: nothing may hang
PROMPT_A, PROMPT_B = random_ids(22, seed=21), random_ids(22, seed=22)
MORE = [random_ids(22, seed=100 + i) for i in range(30)]  # keeps the group busy until rank 1 is killed


def disk_config(root: Path) -> dict[str, Any]:
    return {"model_path": str(root / "tiny"), "block_size": 4, "max_memory": 1 << 20, "cpu_tier_bytes": 0,
            "enable_persistence": True, "persistence_path": str(root / "disk"), "model_cache_dir": str(root / "models"),
            "device": "cpu"}


def rank_lines(root: Path, rank: int) -> list[dict[str, Any]]:
    path = root / "degree2" / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def degree_one(root: Path, prompt: list[int]) -> tuple[GenerationResult, str]:
    """A fresh degree-1 process state here: the model from the folder, a new pool, the disk tier scanned anew."""
    config = KVCacheConfig(**disk_config(root))
    loaded = load_sharded_model(root / "tiny", ShardGroup.single(), config, ByteTextCodec())
    spec = loaded.kv_spec(4)
    namespace = loaded.namespace(spec)
    lower = LowerTiers.from_config(config, namespace.digest)
    paged = KVCacheManager(config, spec, namespace=namespace, lower=lower)
    with torch.inference_mode():
        result = generate_with_prefix_cache(loaded.model, paged, [prompt], max_new_tokens=NEW, do_sample=False,
                                            pad_token_id=ByteTextCodec().pad_token_id)
    lower.close()  # waits for the write-through, makes it durable
    return result, namespace.digest.hex()


def run_degree_two_until_rank_one_dies(root: Path) -> RankLauncher:
    job = PromptJob(disk_config(root), [PROMPT_A, PROMPT_B, PROMPT_B, *MORE], NEW, tokenizer="bytes", timeout_s=30)
    (root / "job.json").write_text(job.to_json())
    command = [sys.executable, "-m", "ultra_adaptive_kv_cache_engine.model.parallel.prompt_job",
               str(root / "job.json"), str(root / "degree2")]
    launcher = RankLauncher(2, command, log_dir=root / "degree2" / "logs", grace_s=20.0)
    launcher.start()
    deadline = time.monotonic() + BOUND_S
    while len(rank_lines(root, 1)) < 4 and launcher.processes[1].poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # header + the three story requests
    launcher.kill_rank(1, signal.SIGKILL)
    return launcher


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tp")
    lm = tiny_model()
    lm.model.save_pretrained(root / "tiny")
    expected = {name: baseline_generate(lm, p, NEW)[0].tolist() for name, p in (("A", PROMPT_A), ("B", PROMPT_B))}
    first, namespace = degree_one(root, PROMPT_A)
    launched = run_degree_two_until_rank_one_dies(root).wait(BOUND_S)
    ranks = [rank_lines(root, r) for r in range(2)]
    after, _ = degree_one(root, PROMPT_B)
    yield {"root": root, "expected": expected, "first": first, "launched": launched, "ranks": ranks,
           "after": after, "namespace": namespace}
    torch.set_num_threads(threads)


def requests(story: dict[str, Any], rank: int) -> list[dict[str, Any]]:
    """The three story requests of one rank (after its header line)."""
    return story["ranks"][rank][1:4]


def test_each_rank_holds_its_slice_under_the_degree_one_namespace(story):
    headers = [lines[0] for lines in story["ranks"]]
    assert headers == [{"rank": r, "degree": 2, "namespace": story["namespace"], "kv_heads": 1} for r in range(2)]


def test_greedy_output_at_degree_two_equals_degree_one_token_for_token(story):
    a, b = story["expected"]["A"], story["expected"]["B"]
    assert story["first"].output_ids[0].tolist() == a
    for rank in range(2):
        assert [line["output_ids"] for line in requests(story, rank)] == [a, b, b]
    assert story["after"].output_ids[0].tolist() == b


def test_a_cache_written_at_degree_one_is_a_hit_at_degree_two(story):
    hit = requests(story, 0)[0]
    assert (hit["local_blocks"], hit["fetched_blocks"], hit["cached_tokens"]) == (0, 5, 20)
    assert (hit["published_blocks"], hit["persisted_blocks"]) == (0, 0)  # degree 1 stored all 7 blocks already


def test_a_cache_written_at_degree_two_is_a_hit_at_degree_one(story):
    miss, pool_hit = requests(story, 0)[1:]
    assert (miss["cached_tokens"], miss["fetched_blocks"], miss["published_blocks"], miss["persisted_blocks"]) == (
        0, 0, 7, 7)
    assert (pool_hit["local_blocks"], pool_hit["fetched_blocks"], pool_hit["cached_tokens"]) == (5, 0, 20)
    # After rank 1 died, a restarted degree 1 loads B's 5 prompt blocks from the disk tier.
    assert story["after"].cached_tokens == 20 and story["after"].committed_blocks == 2


def test_ranks_agree_on_every_block_table_and_decision(story):
    keys = ("output_ids", "cached_tokens", "local_blocks", "fetched_blocks", "published_blocks", "block_table",
            "persisted_blocks")
    rank0, rank1 = ([[line[k] for k in keys] for line in requests(story, r)] for r in range(2))
    assert rank0 == rank1
    tables = [line["block_table"] for line in requests(story, 0)]
    assert tables == [list(range(7)), list(range(7, 14)), list(range(7, 14))]


def test_a_dead_rank_stops_the_group_with_a_clear_error(story):
    result = story["launched"]
    assert result.first_failed_rank == 1 and result.returncodes == (EXIT_GROUP_BROKE, -signal.SIGKILL)
    assert result.stopped_ranks == () and not result.timed_out  # rank 0 stopped on its own, well within the bound
    error = (story["root"] / "degree2" / "logs" / "rank0.err").read_text()
    assert "RankFailureError: tensor-parallel group of 2 ranks broke during" in error
    assert "A peer rank died or did not answer within the group's timeout" in error
    answered = len(story["ranks"][0]) - 1
    assert 3 <= answered < 3 + len(MORE) and not any(line.get("done") for line in story["ranks"][0])


# -- a stalled rank: the group's timeout, without a model ----------------------------------------------------
PROBE = """
import sys, time
from ultra_adaptive_kv_cache_engine.cache.sharded_group import (
    RankDivergenceError, RankFailureError, ShardGroup, exit_after_group_failure)
group = ShardGroup.from_environment("cpu", timeout_s=2.0)
print("broadcast", group.broadcast_ints([5, 6] if group.is_first else None), flush=True)
group.check_agree(b"same", "a shared payload")
try:
    group.check_agree(bytes([group.rank]), "a per-rank payload")
except RankDivergenceError as exc:
    print("diverged", str(exc).split(" (")[0], flush=True)
if group.rank == 1:
    time.sleep(120)
try:
    group.broadcast_ints([1])
except RankFailureError as exc:
    print("failed", str(exc).split(":")[0], flush=True)
    exit_after_group_failure()
"""


def test_a_stalled_rank_times_out_instead_of_hanging(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    launcher = RankLauncher(2, [sys.executable, str(tmp_path / "probe.py")], log_dir=tmp_path / "logs", grace_s=0.5)
    launcher.start()
    result = launcher.wait(BOUND_S)
    out = [(tmp_path / "logs" / f"rank{r}.out").read_text().splitlines() for r in range(2)]
    diverged = "diverged ranks of the tensor-parallel group disagree on a per-rank payload"
    assert out[0] == ["broadcast (5, 6)", diverged, "failed tensor-parallel group of 2 ranks broke during broadcast on rank 0"]
    assert out[1] == ["broadcast (5, 6)", diverged]
    assert result.returncodes[0] == EXIT_GROUP_BROKE and result.stopped_ranks == (1,)
