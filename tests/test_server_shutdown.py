"""Graceful shutdown of a real server process: SIGTERM stops new connections, lets the in-flight stream
finish, persists the cache when persistence is on, closes the engine and exits 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_SERVER = """
import sys
from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import serve_command

config = KVCacheConfig(block_size=4, max_memory=2 * 1024**2, enable_persistence=True, persistence_path=sys.argv[1])
sys.exit(serve_command(config, ServerConfig(port=0), model=build_tiny_llama()))
"""


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """The server process (its output to `log`, never a pipe it could fill) and its URL once it listens."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    with log.open("wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300  # a bound against a hang (the real model loads in this time)
    while time.monotonic() < deadline:
        match = re.search(r"uakv serve: \S+ on (http://\S+)", log.read_text())
        if match:
            url = match.group(1)
            if _healthy(url):
                return process, url
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_sigterm_drains_the_in_flight_stream_persists_and_exits_0(tmp_path):
    log = tmp_path / "server.log"
    process, url = start([sys.executable, "-c", TINY_SERVER, str(tmp_path / "cache")], log)
    try:
        request = {"model": "tiny-llama-L2-H64-A4-KV2-V320-seed0", "prompt": "A long story:", "temperature": 0,
                   "max_tokens": 300, "stream": True}
        with httpx.Client(base_url=url, timeout=120) as client, \
                client.stream("POST", "/v1/completions", json=request) as response:
            events = response.iter_lines()
            first = next(e for e in events if e.startswith("data: "))
            process.send_signal(signal.SIGTERM)  # while the stream is in flight
            rest = [e for e in events if e.startswith("data: ")]
        chunks = [json.loads(e[len("data: "):]) for e in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]" and chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()
    assert "persisted on shutdown" in output and "uakv serve: stopped" in output
    assert any((tmp_path / "cache").rglob("*")), "the persisted cache folder is empty"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)


@pytest.mark.slow
def test_uakv_serve_answers_the_openai_client_then_stops_on_sigterm(tmp_path):
    log = tmp_path / "server.log"
    process, url = start([sys.executable, "-m", "ultra_adaptive_kv_cache_engine", "serve", "--port", "0",
                          "--max-new-tokens", "4", "--max-memory", "16MiB"], log)
    try:
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
            model = client.models.list().data[0].id
            assert model == "SmolLM2-135M-Instruct.Q4_1"
            messages = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}]
            first = client.chat.completions.create(model=model, messages=messages, temperature=0)
            second = client.chat.completions.create(model=model, messages=messages, temperature=0)
        assert first.usage.completion_tokens <= 4 and first.choices[0].message.content
        assert second.usage.prompt_tokens_details.cached_tokens > 0
        assert second.choices[0].message.content == first.choices[0].message.content
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "uakv serve: stopped" in log.read_text()
