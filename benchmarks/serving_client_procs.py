"""Closed-loop completion clients spread over several processes, so that the load generator is not the
bottleneck: one asyncio process parsing 64 streams of server-sent events (one event per token per stream) can
fall behind a fast GPU server, and its own lag then reads as the server's latency.

`run_completions_procs(url, model, prompts, max_tokens, clients, procs, ...)` splits the clients (client i
goes to process i % procs, with the prompts client i would send in `serving_client.run_completions`), starts
`procs` processes of this file, which all begin at one agreed wall-clock instant, and gathers their
`RequestRecord`s: times are relative to that instant in every process, so the records pool as if one client
had sent them. The processes talk JSON over stdin/stdout. With `procs == 1` it runs in this process.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serving_stats import RequestRecord

START_DELAY_S = 1.0  # the processes start this long after they are launched (interpreter and imports)


async def _client_loops(url: str, model: str, prompts: Sequence[Sequence[str]], max_tokens: int, server: str,
                        workload: str, rnd: int, t0: float) -> list[RequestRecord]:
    """One closed-loop client per list of prompts, all on one httpx client, times relative to `t0`."""
    from serving_client import new_client, stream_request

    records: list[RequestRecord] = []

    async def loop(client: Any, i: int, own: Sequence[str]) -> None:
        for turn, prompt in enumerate(own):
            record = RequestRecord(server, workload, rnd, i, turn, 0.0, max_tokens)
            records.append(record)
            await stream_request(client, url + "/v1/completions",
                                 {"model": model, "prompt": prompt, "max_tokens": max_tokens}, record, t0)

    delay = t0 - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    async with new_client(len(prompts)) as client:
        await asyncio.gather(*(loop(client, i, own) for i, own in enumerate(prompts)))
    return records


def _child() -> int:
    """The process side: a JSON job on stdin, the records as one JSON list on stdout."""
    job = json.loads(sys.stdin.read())
    t0 = time.perf_counter() + (job["start_at"] - time.time())
    records = asyncio.run(_client_loops(job["url"], job["model"], job["prompts"], job["max_tokens"], job["server"],
                                        job["workload"], job["round"], t0))
    for r in records:
        r.client = job["clients"][r.client]  # the client's number among all processes' clients
    sys.stdout.write(json.dumps([asdict(r) for r in records]))
    return 0


def run_completions_procs(url: str, model: str, prompts: Sequence[str], max_tokens: int, clients: int, procs: int,
                          server: str, workload: str, rnd: int) -> list[RequestRecord]:
    """`clients` closed-loop clients over `procs` processes (see the module docstring)."""
    if procs < 1 or clients < 1:
        raise ValueError(f"procs={procs}, clients={clients}; expected positive integers")
    own = {i: list(prompts[i::clients]) for i in range(clients)}
    if procs == 1:
        t0 = time.perf_counter()
        return asyncio.run(_client_loops(url, model, [own[i] for i in range(clients)], max_tokens, server,
                                         workload, rnd, t0))
    start_at = time.time() + START_DELAY_S + 0.1 * procs
    children = []
    for p in range(procs):
        ids = list(range(p, clients, procs))
        job = {"url": url, "model": model, "prompts": [own[i] for i in ids], "clients": ids, "max_tokens": max_tokens,
               "server": server, "workload": workload, "round": rnd, "start_at": start_at}
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve())], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, cwd=str(Path(__file__).resolve().parent))
        assert child.stdin is not None
        child.stdin.write(json.dumps(job).encode())
        child.stdin.close()
        children.append(child)
    records: list[RequestRecord] = []
    try:
        for child in children:
            assert child.stdout is not None
            out = child.stdout.read()
            if child.wait() != 0:
                raise RuntimeError(f"a client process exited with status {child.returncode}")
            records += [RequestRecord(**r) for r in json.loads(out)]
    finally:
        for child in children:  # a failed sibling leaves none running
            if child.poll() is None:
                child.kill()
                child.wait()
    return records


if __name__ == "__main__":
    sys.exit(_child())
