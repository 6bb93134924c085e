"""A real redis-server for tests: a free loopback port, a temporary folder, stopped by its pid.

`redis_or_skip()` says whether tests may run: the binary must exist; outside CI a missing binary skips the
test, in CI (CI=true) it fails it. `RedisServer.start(folder)` launches one instance (optionally
cluster-enabled) and waits for PING; `stop()` kills exactly that pid; `restart()` brings it back on the same
port. `start_cluster(folder, n)` starts n cluster-enabled instances and joins them with `redis-cli --cluster
create ... --cluster-replicas 0 --cluster-yes`.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

START_TIMEOUT_S = 10.0


def redis_or_skip(binary: str = "redis-server") -> str:
    """The path of `binary`; pytest.skip outside CI, pytest.fail in CI when it is missing."""
    path = shutil.which(binary)
    if path is None:
        message = f"{binary} is not installed (apt-get install redis-server)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for cluster mode also free at port + 10000 (the cluster bus), below 55536."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 45000)
        if _bindable(port) and (not cluster or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free loopback port found")


@dataclass
class RedisServer:
    """One redis-server process on 127.0.0.1:`port` with its files in `folder`."""

    folder: Path
    port: int
    cluster: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @classmethod
    def start(cls, folder: Path, port: int | None = None, cluster: bool = False) -> RedisServer:
        server = cls(folder, port or free_port(cluster), cluster)
        server.restart()
        return server

    def restart(self) -> None:
        """Start (again) on the same port; waits until PING answers."""
        binary = redis_or_skip()
        self.folder.mkdir(parents=True, exist_ok=True)
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.folder), "--daemonize", "no", "--loglevel", "warning"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{self.port}.conf",
                     "--cluster-node-timeout", "2000"]
        log = open(self.folder / f"redis-{self.port}.log", "ab")
        self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self._wait_for_ping()

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    if self.process is not None and self.process.poll() is not None:
                        raise RuntimeError(f"redis-server on port {self.port} exited: see {self.folder}") from None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGKILL this server's pid and reap it (a no-op if it is not running)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self.process = None


def start_cluster(folder: Path, n: int = 3) -> list[RedisServer]:
    """n cluster-enabled servers joined into one cluster (all 16384 slots assigned, state ok)."""
    cli = redis_or_skip("redis-cli")
    servers: list[RedisServer] = []
    try:
        for i in range(n):
            servers.append(RedisServer.start(folder / f"node{i}", cluster=True))
        nodes = [f"127.0.0.1:{s.port}" for s in servers]
        subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        _wait_cluster_ok(servers)
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def _wait_cluster_ok(servers: list[RedisServer]) -> None:
    deadline = time.monotonic() + 30
    for s in servers:
        client = redis.Redis(host="127.0.0.1", port=s.port)
        try:
            while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster did not reach state ok on port {s.port}")
                time.sleep(0.05)
        finally:
            client.close()
