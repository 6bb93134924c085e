"""`RankLauncher`: starts the N ranks of one command (what torchrun does, without its agent), watches them,
and stops the whole group when one fails.

Rank r gets RANK=r, LOCAL_RANK=r, WORLD_SIZE=N, MASTER_ADDR=127.0.0.1 and MASTER_PORT (a free loopback
port), plus OMP_NUM_THREADS=1 unless set, so `ShardGroup.from_environment()` works the same under torchrun
and under this launcher.

Failure behaviour: when a rank exits non-zero or is killed, the others get `grace_s` seconds to notice on
their own (their next collective raises `RankFailureError`, they flush and exit non-zero), then SIGTERM,
then SIGKILL. `wait` returns within its timeout whatever the ranks do; the result names the first rank
that failed and the ranks that had to be stopped.

Command line (e.g. behind ``uakv serve --tensor-parallel N``)::

    python -m ultra_adaptive_kv_cache_engine.model.parallel.launcher --nproc 2 -- python -m my.module args
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ...cache.sharded_group import EXIT_GROUP_BROKE

POLL_S = 0.02
KILL_AFTER_TERM_S = 5.0


def free_port() -> int:
    """A TCP port free on the loopback interface now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _root_cause(codes: Sequence[int | None]) -> int | None:
    """The rank whose failure started it all among exited ranks: a follower's EXIT_GROUP_BROKE counts last."""
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    causes = [r for r in failed if codes[r] != EXIT_GROUP_BROKE]
    return (causes or failed or [None])[0]


@dataclass(frozen=True)
class LaunchResult:
    """Exit codes by rank (negative: killed by that signal), the first failure, and the ranks stopped."""

    returncodes: tuple[int, ...]
    first_failed_rank: int | None
    stopped_ranks: tuple[int, ...]
    timed_out: bool

    @property
    def ok(self) -> bool:
        return self.first_failed_rank is None and not self.timed_out

    def describe(self) -> str:
        """One line saying what happened, for logs and error messages."""
        if self.ok:
            return f"all {len(self.returncodes)} ranks exited 0"
        why = "the launch timed out" if self.timed_out else ""
        if self.first_failed_rank is not None:
            code = self.returncodes[self.first_failed_rank]
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            why = f"rank {self.first_failed_rank} {how}"
        return f"tensor-parallel group stopped: {why}; exit codes by rank {list(self.returncodes)}; " \
               f"stopped by the launcher: {list(self.stopped_ranks)}"


class RankLauncher:
    """Runs `command` once per rank of a group of `degree` ranks; see the module docstring.

    With `log_dir`, rank r's stdout and stderr go to ``rank{r}.out`` / ``rank{r}.err`` there.
    """

    def __init__(
        self,
        degree: int,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_dir: str | os.PathLike[str] | None = None,
        grace_s: float = 30.0,
        master_port: int | None = None,
    ) -> None:
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree={degree!r} must be a positive integer")
        if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
            raise ValueError(f"command={command!r} must be a non-empty list of strings")
        if not grace_s >= 0:
            raise ValueError(f"grace_s={grace_s!r} must be a non-negative number of seconds")
        self.degree, self.command, self.grace_s = degree, list(command), float(grace_s)
        self.env = dict(os.environ if env is None else env)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.master_port = master_port if master_port is not None else free_port()
        self.processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []

    def rank_env(self, rank: int) -> dict[str, str]:
        env = dict(self.env)
        env.setdefault("OMP_NUM_THREADS", "1")
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(self.degree),
                   LOCAL_WORLD_SIZE=str(self.degree), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.master_port))
        return env

    def start(self) -> None:
        """Starts every rank (once)."""
        if self.processes:
            raise RuntimeError("this launcher already started its ranks")
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(self.degree):
            out = err = None
            if self.log_dir is not None:
                out, err = open(self.log_dir / f"rank{rank}.out", "wb"), open(self.log_dir / f"rank{rank}.err", "wb")
                self._logs += [out, err]
            self.processes.append(subprocess.Popen(self.command, env=self.rank_env(rank), stdout=out, stderr=err))

    def kill_rank(self, rank: int, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to one rank (operations and failure tests)."""
        self.processes[rank].send_signal(sig)

    def wait(self, timeout_s: float | None = None) -> LaunchResult:
        """Waits for every rank; on the first failure, stops the others after `grace_s`; see the module doc."""
        if not self.processes:
            raise RuntimeError("start() the ranks before wait()")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        first_failed: int | None = None
        stop_at: float | None = None
        timed_out = False
        while any([p.poll() is None for p in self.processes]):  # a list: poll every rank, not only the first
            now = time.monotonic()
            if first_failed is None:
                first_failed = _root_cause([p.returncode for p in self.processes])
                stop_at = None if first_failed is None else now + self.grace_s
            timed_out = deadline is not None and now >= deadline
            if timed_out or (stop_at is not None and now >= stop_at):
                break
            time.sleep(POLL_S)
        stopped = self.stop()
        codes = tuple(int(p.returncode) for p in self.processes)
        if first_failed is None:
            first_failed = _root_cause([None if r in stopped else c for r, c in enumerate(codes)])
        return LaunchResult(codes, first_failed, stopped, timed_out)

    def stop(self) -> tuple[int, ...]:
        """Terminates ranks still running (SIGTERM, then SIGKILL); returns which ranks it had to stop."""
        alive = [r for r, p in enumerate(self.processes) if p.poll() is None]
        for rank in alive:
            self.processes[rank].terminate()
            self.processes[rank].send_signal(signal.SIGCONT)  # a stopped (stalled) rank must run to terminate
        for rank in alive:
            try:
                self.processes[rank].wait(KILL_AFTER_TERM_S)
            except subprocess.TimeoutExpired:
                self.processes[rank].kill()
                self.processes[rank].wait()
        for log in self._logs:
            log.close()
        self._logs = []
        return tuple(alive)

    def __enter__(self) -> RankLauncher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """`--nproc N [--grace-s S] [--timeout-s T] -- command...`; exit code 0, or the first failed rank's."""
    parser = argparse.ArgumentParser(description="start the ranks of a tensor-parallel group on this host")
    parser.add_argument("--nproc", type=int, required=True, help="tensor-parallel degree (ranks to start)")
    parser.add_argument("--grace-s", type=float, default=30.0, help="seconds survivors get after a rank fails")
    parser.add_argument("--timeout-s", type=float, default=None, help="stop every rank after this long")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each rank runs (after --)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    launcher = RankLauncher(args.nproc, command, grace_s=args.grace_s)
    launcher.start()
    try:
        result = launcher.wait(args.timeout_s)
    except KeyboardInterrupt:
        launcher.stop()
        return 130
    if not result.ok:
        print(result.describe(), file=sys.stderr)
        code = result.returncodes[result.first_failed_rank] if result.first_failed_rank is not None else 1
        return code if code > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
