"""The `uakv` command line: each command run for real (the embedded SmolLM2 where a model is needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ultra_adaptive_kv_cache_engine.cli import _parse_capacity, build_parser, main
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.config_sources import field_table, load_config, parse_tiers

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
    assert "option --cache-strategy: cache_strategy='bogus' is not a known strategy" in capsys.readouterr().err


ENGINE_COMMANDS = (["demo"], ["generate", "hi"], ["chat"], ["info"], ["config"])


@pytest.mark.parametrize("command", ENGINE_COMMANDS, ids=lambda c: c[0])
def test_every_field_is_an_option_of_every_engine_command(command, tmp_path):
    argv = [*command, "--config", str(tmp_path / "f.toml")]
    for f in field_table():
        text = f.kind.format(f.default)
        argv += [f.option if text == "true" else f"--no-{f.option[2:]}"] if f.kind.name == "bool" else [
            f"{f.option}={text}"]
    args = build_parser().parse_args(argv)
    assert args.config_file == str(tmp_path / "f.toml")
    assert {f.name for f in field_table()} <= set(vars(args))
    bare = build_parser().parse_args(command)  # options not given are absent, so lower layers show through
    assert not {f.name for f in field_table()} & set(vars(bare)) and bare.config_file is None


def _config_output(capsys, argv: list[str]) -> str:
    assert main(["config", *argv]) == 0
    return capsys.readouterr().out


def _line(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"{name} = "))


def test_config_command_output_reads_back_equal(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UAKV_DISK_LAYOUT", "segments")
    out = _config_output(capsys, [
        "--model", "m.gguf", "--strategy", "lru", "--persist", "--tenant", 'a"b', "--profile", "--max-tokens", "12",
        "--tiers", "cpu:1GiB:lru,disk::s3fifo:zstd", "--max-memory", "1.5GB", "--no-enable-metrics", "--dtype=none"])
    saved = tmp_path / "saved.toml"
    saved.write_text(out)
    expected = KVCacheConfig(
        model_path="m.gguf", cache_strategy="lru", enable_persistence=True, tenant_salt='a"b', enable_profiling=True,
        max_tokens=12, tiers=parse_tiers("cpu:1GiB:lru,disk::s3fifo:zstd"), max_memory=1_500_000_000,
        enable_metrics=False, disk_layout="segments")
    assert load_config({}, saved, {}) == expected
    assert _line(out, "model_path") == 'model_path = "m.gguf"  # flag --model-path'
    assert _line(out, "disk_layout") == 'disk_layout = "segments"  # env UAKV_DISK_LAYOUT'
    assert _line(out, "block_size") == "block_size = 16  # default"
    # Loaded back through --config, with an option and a variable above the file.
    monkeypatch.setenv("UAKV_BLOCK_SIZE", "32")
    again = _config_output(capsys, ["--config", str(saved), "--max-tokens", "99"])
    assert _line(again, "max_tokens") == "max_tokens = 99  # flag --max-tokens"
    assert _line(again, "block_size") == "block_size = 32  # env UAKV_BLOCK_SIZE"
    assert _line(again, "tenant_salt") == f'tenant_salt = "a\\"b"  # file {saved}'


def test_config_errors_exit_2_naming_the_source(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_token = 3\n")
    assert main(["config", "--config", str(bad)]) == 2
    assert f"config file {bad}, key max_token: unknown config field(s) ['max_token']" in capsys.readouterr().err
    assert main(["config", "--config", str(tmp_path / "none.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["config", "--cpu-tier-bytes", "lots"]) == 2
    assert "option --cpu-tier-bytes: 'lots' is not a size in bytes" in capsys.readouterr().err
    monkeypatch.setenv("UAKV_MAX_TOKEN", "3")
    assert main(["info"]) == 2  # before any model is loaded
    assert "UAKV_MAX_TOKEN='3' is not a configuration variable; did you mean UAKV_MAX_TOKENS?" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_json_with_the_embedded_model(capsys):
    assert main(["generate", "What is two plus two?", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["completion_tokens"] <= 4 and result["prompt_tokens"] > 10 and result["cache_hit"] is False


@pytest.mark.slow
def test_info_describes_the_embedded_model(capsys, tmp_path):
    config = tmp_path / "uakv.toml"
    config.write_text('block_size = 32\nenable_metrics = false\nmax_memory = "8MiB"\n')
    assert main(["info", "--config", str(config), "--max-tokens", "1024"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    assert (info["kv"]["layers"], info["kv"]["kv_heads"], info["kv"]["head_dim"]) == (30, 3, 64)
    assert info["kv"]["block_size"] == 32  # the pool is sized in bytes by max_memory, never by max_tokens
    assert info["kv"]["pool_blocks"] == 8 * 2**20 // info["kv"]["bytes_per_block"]
    assert (info["config"]["max_tokens"], info["config"]["enable_metrics"]) == (1024, False)


@pytest.mark.slow
def test_chat_shows_cached_tokens_on_the_second_turn():
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "ultra_adaptive_kv_cache_engine", "chat", "--max-new-tokens", "4",
                           "--system", "Answer in one word."], input="Hi\nAnd again?\n/exit\n", env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    turns = [line for line in done.stdout.splitlines() if line.strip().startswith("[prompt")]
    assert len(turns) == 2
    assert "cached 0," in turns[0] and "cached 0," not in turns[1]
