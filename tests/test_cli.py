"""The `uakv` command line: each command run for real (the embedded SmolLM2 where a model is needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ultra_adaptive_kv_cache_engine.cli import _parse_capacity, main

SRC = Path(__file__).resolve().parents[1] / "src"


def test_replay_prints_one_json_line_per_run_and_a_plot(tmp_path, capsys):
    plot = tmp_path / "hit.png"
    code = main(["replay", "--workload", "chat", "--requests", "200", "--capacities", "50k,200k",
                 "--policies", "lru,belady", "--plot", str(plot)])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["policy"], r["capacity_tokens"]) for r in lines] == [
        ("lru", 50_000), ("lru", 200_000), ("belady", 50_000), ("belady", 200_000)]
    assert all(r["requests"] == 200 for r in lines)
    assert lines[2]["block_hit_rate"] >= lines[0]["block_hit_rate"]  # Belady bounds LRU at equal capacity
    assert plot.stat().st_size > 0 and plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("text", "tokens"), [("3M", 3_000_000), ("500k", 500_000), ("2048", 2048), ("0.5m", 500_000)])
def test_capacity_parsing(text, tokens):
    assert _parse_capacity(text) == tokens


def test_bad_options_exit_2_with_a_named_error(capsys):
    assert main(["replay", "--capacities", "lots"]) == 2
    assert "capacity 'lots' is not a number of tokens" in capsys.readouterr().err
    assert main(["replay", "--workload", "nope", "--requests", "10"]) == 2
    assert "workload 'nope' is unknown" in capsys.readouterr().err
    assert main(["info", "--strategy", "bogus"]) == 2
    assert "cache_strategy='bogus' is not a known strategy" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_json_with_the_embedded_model(capsys):
    assert main(["generate", "What is two plus two?", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["completion_tokens"] <= 4 and result["prompt_tokens"] > 10 and result["cache_hit"] is False


@pytest.mark.slow
def test_info_describes_the_embedded_model(capsys):
    assert main(["info", "--block-size", "32", "--max-tokens", "1024"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert (info["kv"]["layers"], info["kv"]["kv_heads"], info["kv"]["head_dim"]) == (30, 3, 64)
    assert info["kv"]["block_size"] == 32 and info["kv"]["pool_blocks"] == 32


@pytest.mark.slow
def test_chat_shows_cached_tokens_on_the_second_turn():
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ultra_adaptive_kv_cache_engine", "chat", "--max-new-tokens", "4",
                           "--system", "Answer in one word."], input="Hi\nAnd again?\n/exit\n", env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    turns = [line for line in done.stdout.splitlines() if line.strip().startswith("[prompt")]
    assert len(turns) == 2
    assert "cached 0," in turns[0] and "cached 0," not in turns[1]
