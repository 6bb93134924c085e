"""`run_on_setup_thread`: the function runs on a thread of its own that has ended when the call returns; its
result comes back and its exception is raised on the caller's thread."""

from __future__ import annotations

import threading

import pytest

from ultra_adaptive_kv_cache_engine.engine.setup_thread import run_on_setup_thread


def test_runs_on_another_thread_that_has_ended_and_returns_the_result():
    seen: list[threading.Thread] = []

    def work() -> tuple[int, str]:
        seen.append(threading.current_thread())
        return 42, "built"

    assert run_on_setup_thread(work, name="uakv-test-setup") == (42, "built")
    assert len(seen) == 1 and seen[0] is not threading.current_thread()
    assert seen[0].name == "uakv-test-setup" and not seen[0].is_alive()


def test_the_exception_is_raised_on_the_caller_thread_as_it_was():
    error = ValueError("bad model path 'x'; expected a folder")

    def work() -> None:
        raise error

    with pytest.raises(ValueError) as caught:
        run_on_setup_thread(work)
    assert caught.value is error
    assert caught.value.__traceback__ is not None


def test_a_none_result_is_returned_as_none():
    assert run_on_setup_thread(lambda: None) is None
