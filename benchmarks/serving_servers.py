"""The servers bench_serving.py measures, each a subprocess on a free loopback port.

`ServerProcess(name, argv, log_path)`: started by `start()`, ready when GET /health answers 200
(`wait_ready`), stopped by `stop()`: `stop_signal` (SIGTERM; SIGINT for `transformers serve`, which shuts
down gracefully on SIGINT only) to its pid, SIGKILL after `grace_s` if it has not exited. It is a
context manager, so a benchmark that fails still stops what it started. Nothing here kills by name.
`ours_argv` is `uakv serve` (through `python -m ultra_adaptive_kv_cache_engine`); `baseline_argv` is
`transformers serve --continuous-batching` on the same model folder.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment, with the Hugging Face hub kept offline and Python unbuffered."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.update(extra or {})
    return env


class ServerProcess:
    """One server subprocess (see the module docstring); output goes to `log_path`."""

    def __init__(self, name: str, argv: Sequence[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, stop_signal: int = signal.SIGTERM) -> None:
        self.name, self.argv, self.port, self.log_path = name, list(argv), port, log_path
        self.stop_signal = stop_signal
        self.env = env if env is not None else offline_env()
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        self.started_s: float | None = None
        self.ready_s: float | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.started_s = time.monotonic()
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     stdin=subprocess.DEVNULL)
        return self

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start to the first 200 from /health; RuntimeError (with the log's tail) when the
        process exits or the time runs out first."""
        assert self.proc is not None and self.started_s is not None, "start() first"
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=2.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with status {self.proc.returncode} before it was ready; "
                                       f"log tail: {self.log_tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        self.ready_s = time.monotonic() - self.started_s
                        return self.ready_s
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout_s:.0f} s; log tail: {self.log_tail()}")

    def stop(self, grace_s: float = 10.0) -> int | None:
        """`stop_signal`, then SIGKILL after `grace_s`; the exit status (None if it was never started)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ours_argv(port: int, extra: Sequence[str] = ()) -> list[str]:
    """`uakv serve` on 127.0.0.1:`port` with the embedded model on the CPU."""
    return [sys.executable, "-m", "ultra_adaptive_kv_cache_engine", "serve", "--host", "127.0.0.1",
            "--port", str(port), "--device", "cpu", *extra]


def baseline_argv(port: int, model_folder: Path, extra: Sequence[str] = ()) -> list[str]:
    """`transformers serve --continuous-batching` on 127.0.0.1:`port` serving `model_folder` on the CPU."""
    return [sys.executable, "-c", "import sys; from transformers.cli.transformers import main; sys.exit(main())",
            "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            *extra, str(model_folder)]
