"""Heavy CPU setup on a short-lived thread, so that the calling thread never owns an OpenMP thread team.

PyTorch's CPU builds run their parallel ops through GNU OpenMP, which gives every thread that ever ran a
parallel region a team of worker threads of its own, kept for as long as that thread lives. When the threads of
all teams together outnumber the CPUs, it stops spinning at its barriers and parks its workers on futexes, so
every parallel op pays for a wake-up. A session's steps run on its step-loop thread; if the thread that built the
session (a server's event loop, a user's main thread) had run parallel ops while building it (loading the model,
zeroing the pool, the transposed weight copies of the CPU backend), its idle team lived on beside the step
loop's. Measured on 2 cores with SmolLM2 in-process (2026-12-04): a batch-1 decode step took 66 to 70 ms with the
session built on the caller's thread and 32 to 40 ms with it built here; 8 concurrent sequences went from 40 to
49-57 output tok/s. A thread that exits takes its team with it.

What this does not cover: a caller whose thread already ran parallel torch work before the session was built
(a team is there already), parallel ops the caller runs while the session serves, and the session's own
background threads (tier writers, the shadow verifier) once they run a parallel op: a live thread that ran one
parallel copy made the same products on another thread 1.6x slower in a micro-test (7.5 -> 12.6 ms).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def run_on_setup_thread(fn: Callable[[], T], name: str = "uakv-setup") -> T:
    """`fn()` run on a new thread that ends when it returns; its result, or its exception raised here (with
    its own traceback)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised on the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
