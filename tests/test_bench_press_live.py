"""bench_press_live's quick run: one JSON line, exact block counts of the pressed and unpressed requests, the
repeat's reuse, nothing written with --no-save (the real SmolLM2, so marked slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_quick_run_reports_the_blocks_a_press_saves_and_its_reuse(tmp_path):
    env = {**os.environ, "UAKV_RESULTS_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCH / "bench_press_live.py"), "--quick", "--no-save",
                           "--arms", "none", "sinks_window:0.25"],
                          capture_output=True, text=True, env=env, timeout=900, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert len(lines) == 1 and result["benchmark"] == "press_live" and not list(tmp_path.iterdir())
    none, pressed = result["rows"]
    # 384 prompt tokens, 16 new: 399 with KV -> 25 blocks; pressed: 96 of 383 kept, then 16 more -> 7 blocks
    assert (none["held_blocks"], pressed["held_blocks"]) == (25, 7)
    assert (none["repeat_cached_tokens"], pressed["repeat_cached_tokens"]) == (368, 383)
    assert none["repeat_same_tokens"] and pressed["repeat_same_tokens"]
    assert none["idle_all_blocks_free"] and pressed["idle_all_blocks_free"]
