"""bench_kv_quality's pieces in tiny worlds (the tiny random Llama, float32, CPU): windows, chunk spans,
teacher-forced NLL equal to transformers' own, greedy decoding equal to `generate`, pressed branches that leave
the prompt's sequence as it was, the quantized runner's staging and sealing, and (slow) the quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from model_fixtures import baseline_generate, random_ids, tiny_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

from bench_kv_quality import Measures, make_runner, ppl_row  # noqa: E402
from kv_quality_parts import (  # noqa: E402
    QuantKVRunner,
    agreement,
    greedy,
    passkey_prompt,
    perplexity,
    prefill,
    spans,
    teacher_forced,
    text_windows,
    token_nll,
)

from ultra_adaptive_kv_cache_engine.compression.presses import PressConfig  # noqa: E402
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama  # noqa: E402

BS = 4


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(lm) -> PagedLlama:
    return PagedLlama.from_hf(lm.model)


def test_windows_are_seeded_and_disjoint():
    ids = list(range(100))
    assert [w[0] for w in text_windows(ids, 30, 2, seed=0)] == [30, 60]
    windows = text_windows(ids, 30, 3, seed=1)
    assert [w[0] for w in windows] == [0, 30, 60] and all(len(w) == 30 for w in windows)
    assert [(w[0], len(w)) for w in text_windows(ids, 25, 2, seed=5)] == [(50, 25), (75, 25)]
    with pytest.raises(ValueError, match="100 tokens hold 3 windows of 30; asked for 4"):
        text_windows(ids, 30, 4, seed=0)


def test_spans_cut_at_block_multiples():
    assert spans(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert spans(6, 13, 4) == [(6, 8), (8, 12), (12, 13)]
    assert spans(8, 9, 4) == [(8, 9)] and spans(3, 3, 4) == []


def test_nll_perplexity_and_agreement():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    nll = token_nll(logits, [1, 0])
    torch.testing.assert_close(nll, F.cross_entropy(logits.double(), torch.tensor([1, 0]), reduction="none"))
    assert perplexity(torch.tensor([0.0, 0.0])) == 1.0
    assert agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert agreement([5, 6], [5, 6]) == (1.0, 2)


def full_runner(lm, model, num_blocks: int = 24):
    runner = make_runner(lm, model, None, num_blocks, BS, 16)
    assert not isinstance(runner, str)
    return runner


def test_teacher_forced_nll_equals_transformers_and_every_block_comes_back(lm, model):
    runner = full_runner(lm, model)
    ids = random_ids(23, seed=1)
    seq = runner.open()
    head = teacher_forced(runner, seq, ids[:10], ids[1:11], BS)  # the prompt part, then the rest
    rest = teacher_forced(runner, seq, ids[10:], ids[11:], BS)
    assert (seq.length, len(seq.table), head.shape, rest.shape) == (23, 6, (10,), (12,))
    with torch.no_grad():
        logits = lm.model(torch.tensor([ids])).logits[0].double()
    expected = F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none")
    torch.testing.assert_close(torch.cat([head, rest]), expected, rtol=0, atol=1e-4)
    runner.close(seq)
    assert runner.cache.num_free_blocks == 24 and seq.table == []


def test_greedy_equals_generate(lm, model):
    runner = full_runner(lm, model)
    prompt = random_ids(9, seed=2)
    seq = runner.open()
    tokens = greedy(runner, seq, prefill(runner, seq, prompt, BS), 6)
    assert tokens == baseline_generate(lm, prompt, 6)[0, 9:].tolist() and seq.length == 14


def test_a_press_branches_off_the_prompt_and_leaves_it_as_it_was(lm, model):
    runner = full_runner(lm, model)
    prompt = random_ids(19, seed=3)
    seq = runner.open()
    prefill(runner, seq, prompt, BS)
    before = runner.cache.kv[seq.table].clone()
    pressed = runner.press(seq, prompt, PressConfig("sinks_window", ratio=0.4), lm.model.model.rotary_emb.inv_freq)
    assert (pressed.length, len(pressed.table), runner.cache.num_free_blocks) == (8, 2, 24 - 5 - 2)
    assert torch.equal(runner.cache.kv[seq.table], before)
    runner.close(pressed)
    runner.close(seq)
    assert runner.cache.num_free_blocks == 24
    with pytest.raises(RuntimeError, match="kept every token"):
        runner.press(seq, prompt[:4], PressConfig("snapkv", ratio=0.9), None)


def test_passkey_prompt_holds_the_key_at_its_depth_within_the_target(lm):
    codec = lm.tokenizer
    early, late = (codec.decode(passkey_prompt(codec, 400, d, "12345")) for d in (0.1, 0.9))
    assert "12345 is the pass key" in early and early.index("12345") < late.index("12345")
    assert len(passkey_prompt(codec, 400, 0.5, "12345")) <= 400 < len(passkey_prompt(codec, 800, 0.5, "12345"))


def test_ppl_row_compares_with_the_baseline():
    base, ours = Measures(), Measures()
    base.nll = {4: [torch.tensor([1.0, 1.0])], 8: [torch.tensor([2.0])]}
    ours.nll = {4: [torch.tensor([1.0, 1.5])], 8: [torch.tensor([2.0])]}
    row = ppl_row("int8", ours, base, 0.005)
    assert row["increase"]["8"] == 0.0 and row["increase"]["4"] == round(torch.tensor(0.25).exp().item() - 1, 5)
    assert row["meets_goal"] is False and row["goal"] == 0.005


def quant_runner(lm, model, fmt: str, residual: int = 0) -> QuantKVRunner:
    runner = make_runner(lm, model, fmt, 24, BS, 8, residual)
    if isinstance(runner, str):
        pytest.skip(f"quantized pools: {runner}")
    return runner


def test_the_quantized_runner_seals_every_filled_block_and_keeps_the_tail_in_staging(lm, model):
    runner, full = quant_runner(lm, model, "int8"), full_runner(lm, model)
    ids = random_ids(10, seed=4)
    seq, ref = runner.open(), full.open()
    teacher_forced(runner, seq, ids[:8], ids[1:9], 8)  # one chunk of 2 blocks, both sealed after it
    teacher_forced(full, ref, ids[:8], ids[1:9], 8)
    assert runner.sealed[id(seq)] == 2
    spec = runner.cache.spec
    for i in range(2):  # the sealed slabs are the quantized full-precision KV (same chunk, same attention)
        block = full.cache.kv[ref.table[i]]  # (L, 2, bs, H, D)
        for kv in range(2):
            slabs = runner.format.quantize(block[:, kv], kv == 0)
            assert torch.equal(runner.cache.kv[seq.table[i], :, kv], slabs)
    teacher_forced(runner, seq, ids[8:], ids[9:], 8)  # a partial block: in staging 0, not sealed
    assert runner.sealed[id(seq)] == 2 and seq.length == 10
    assert spec.pool_format == "int8"
    runner.close(seq)
    assert runner.cache.num_free_blocks == 24 and runner.sealed == {}


def test_the_quantized_runner_seals_only_blocks_older_than_its_window(lm, model):
    runner = quant_runner(lm, model, "int2", residual=4)
    assert runner.residual == 4 and runner.staging.shape[0] == (8 + 4) // BS + 2
    ids = random_ids(14, seed=5)
    seq = runner.open()
    teacher_forced(runner, seq, ids[:8], ids[1:9], 8)  # 8 tokens: block 1 holds the last 4, staged
    assert runner.sealed[id(seq)] == 1
    teacher_forced(runner, seq, ids[8:11], ids[9:12], 8)  # 11 tokens: the window 7..10 still touches block 1
    assert runner.sealed[id(seq)] == 1
    teacher_forced(runner, seq, ids[11:], ids[12:], 8)  # 14 tokens: window 10..13, blocks 0 and 1 sealed
    assert runner.sealed[id(seq)] == 2 and seq.length == 14
    runner.close(seq)
    assert runner.cache.num_free_blocks == 24 and runner.sealed == {}


@pytest.mark.slow
def test_quick_run_prints_one_json_line_and_writes_only_the_quick_result(tmp_path):
    env = {**os.environ, "UAKV_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCH / "bench_kv_quality.py"), "--quick", "--no-save"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert len(lines) == 1 and result["benchmark"] == "kv_quality" and result["quick"] is True
    assert result["perplexity"]["rows"][0]["setting"] == "full" and not list(tmp_path.iterdir())
    assert {r["press"] for r in result["presses"]["rows"]} == {"sinks_window", "snapkv"}
