"""The pure parts of benchmarks/bench_serving.py: workloads from a small synthetic trace and from text, and the
reductions (percentiles, one server's summary, ratios, goals); and its load generator spread over processes,
against a tiny-model server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from serving_stats import (  # noqa: E402
    RequestRecord,
    first_answers_identical,
    goal,
    percentile,
    ratios,
    summarize,
    wall_time,
)
from serving_workloads import (  # noqa: E402
    ChatSpec,
    TraceRow,
    TraceSpec,
    chat_workload,
    read_trace,
    trace_workload,
)

TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:51.2224670,4000,55
2023-11-16 18:15:52,20,400
"""
TEXT = " ".join(f"w{i}" for i in range(2000))


@pytest.fixture
def trace_file(tmp_path: Path) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    return path


def test_read_trace_times_relative_to_first_selected_row(trace_file: Path) -> None:
    rows = read_trace(trace_file)
    assert rows == [TraceRow(0.0, 374, 44), TraceRow(4.314579, 396, 109), TraceRow(4.541877, 4000, 55),
                    TraceRow(5.31941, 20, 400)]
    assert read_trace(trace_file, start=1, limit=2) == [TraceRow(0.0, 396, 109), TraceRow(0.227298, 4000, 55)]


def test_read_trace_refuses_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("timestamp,input_length\n1,2\n")
    with pytest.raises(ValueError, match="expected TIMESTAMP,ContextTokens,GeneratedTokens"):
        read_trace(path)
    with pytest.raises(ValueError, match="no rows from row 9"):
        read_trace(_write(tmp_path / "t.csv", TRACE), start=9)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_trace_workload_scales_time_and_lengths(trace_file: Path) -> None:
    tokens = list(range(1000))
    spec = TraceSpec(time_scale=2.0, length_scale=0.25, output_scale=0.5, min_prompt_tokens=16,
                     max_prompt_tokens=512, max_output_tokens=32)
    reqs = trace_workload(read_trace(trace_file), spec, tokens, lambda ids: ",".join(map(str, ids)), seed=3)
    assert [r.arrival_s for r in reqs] == [0.0, 8.629158, 9.083754, 10.63882]
    assert [r.prompt_tokens for r in reqs] == [94, 99, 512, 16]  # 374/4 rounded; 4000/4 capped; 20/4 raised to 16
    assert [r.max_tokens for r in reqs] == [22, 32, 28, 32]  # 44/2; 109/2 capped at 32; 55/2 rounded to even
    for r in reqs:
        ids = [int(x) for x in r.prompt.split(",")]
        assert len(ids) == r.prompt_tokens and ids == list(range(ids[0], ids[0] + r.prompt_tokens))
    again = trace_workload(read_trace(trace_file), spec, tokens, lambda ids: ",".join(map(str, ids)), seed=3)
    assert again == reqs


def test_trace_workload_needs_enough_text(trace_file: Path) -> None:
    with pytest.raises(ValueError, match="at least max_prompt_tokens=512"):
        trace_workload(read_trace(trace_file), TraceSpec(), list(range(100)), str, seed=0)


def test_chat_workload_shares_system_prompts_and_is_seeded() -> None:
    spec = ChatSpec(clients=5, turns=3, system_prompts=2, system_words=40, user_words=(5, 9), max_tokens=7,
                    think_s=1.0, start_gap_s=0.5)
    convs = chat_workload(spec, TEXT, seed=1)
    assert [c.client for c in convs] == [0, 1, 2, 3, 4]
    assert convs[0].start_s == 0.0 and all(a.start_s <= b.start_s for a, b in zip(convs, convs[1:], strict=False))
    assert convs[0].system == convs[2].system == convs[4].system != convs[1].system == convs[3].system
    assert all(len(c.system.split()) == 40 for c in convs)
    assert all(len(c.users) == 3 and all(5 <= len(u.split()) <= 9 for u in c.users) for c in convs)
    assert all(c.max_tokens == 7 and len(c.think_s) == 3 and min(c.think_s) > 0 for c in convs)
    words = TEXT.split()
    for u in convs[0].users:  # slices of the text, in order
        first = words.index(u.split()[0])
        assert u == " ".join(words[first : first + len(u.split())])
    assert chat_workload(spec, TEXT, seed=1) == convs != chat_workload(spec, TEXT, seed=2)


def test_chat_workload_refuses_too_little_text() -> None:
    with pytest.raises(ValueError, match="asked for 450 words of text; the text has only 10"):
        chat_workload(ChatSpec(), "a b c d e f g h i j", seed=0)


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([1.0, 2.0, 3.0], 0) == 1.0 and percentile([1.0, 2.0, 3.0], 100) == 3.0
    with pytest.raises(ValueError, match="q=101"):
        percentile([1.0], 101)


def _record(server: str, rnd: int, client: int, sent: float, chunks: list[float], **kw: object) -> RequestRecord:
    rec = RequestRecord(server, "chat", rnd, client, 0, sent, 8, chunk_s=chunks, done_s=sent + chunks[-1] + 0.01)
    for k, v in kw.items():
        setattr(rec, k, v)
    return rec


def test_summarize_pools_requests_and_rounds() -> None:
    records = [
        _record("a", 0, 0, 0.0, [0.1, 0.2, 0.4], prompt_tokens=100, completion_tokens=3, cached_tokens=60),
        _record("a", 0, 1, 1.0, [0.3, 0.4], prompt_tokens=50, completion_tokens=2, cached_tokens=0),
        _record("a", 1, 0, 5.0, [0.5, 0.7, 0.8, 0.9], prompt_tokens=50, completion_tokens=4, cached_tokens=40),
        RequestRecord("a", "chat", 1, 1, 0, 5.5, 8, error="HTTP 429: busy"),
    ]
    s = summarize(records)
    assert wall_time(records) == pytest.approx((1.41 - 0.0) + (5.91 - 5.0))
    assert (s["requests"], s["completed"], s["errors"], s["error_examples"]) == (4, 3, 1, ["HTTP 429: busy"])
    assert (s["output_tokens"], s["prompt_tokens"], s["cached_tokens"]) == (9, 200, 100)
    assert s["prefix_hit_rate"] == 0.5
    assert s["output_tok_s"] == pytest.approx(9 / 2.32, abs=1e-3)
    assert s["request_throughput"] == pytest.approx(3 / 2.32, abs=1e-4)
    assert s["ttft_ms_p50"] == 300.0 and s["ttft_ms_p99"] == pytest.approx(496.0)
    # ITL: gaps 0.1, 0.2 | 0.1 | 0.2, 0.1, 0.1 -> sorted 0.1 x4, 0.2 x2; TPOT: 0.15, 0.1, 0.1333
    assert s["itl_ms_p50"] == 100.0 and s["tpot_ms_p50"] == pytest.approx(133.33, abs=0.01)


def test_summarize_without_cached_tokens_or_usage() -> None:
    rec = _record("b", 0, 0, 0.0, [0.2, 0.3, 0.5])  # no usage: chunks count as tokens
    s = summarize([rec])
    assert (s["output_tokens"], s["cached_tokens"], s["prefix_hit_rate"]) == (3, None, None)
    assert summarize([])["output_tok_s"] is None


def test_ratios_and_goals() -> None:
    ours = {"output_tok_s": 30.0, "ttft_ms_p50": 100.0, "itl_ms_p50": None}
    base = {"output_tok_s": 10.0, "ttft_ms_p50": 400.0, "itl_ms_p50": 5.0}
    r = ratios(ours, base, ("output_tok_s", "ttft_ms_p50", "itl_ms_p50", "missing"))
    assert r == {"output_tok_s": 3.0, "ttft_ms_p50": 0.25, "itl_ms_p50": None, "missing": None}
    assert ratios({"x": 1.0}, {"x": 0}, ("x",)) == {"x": None}
    assert goal("g", 3.0, ">= 1.5") == {"goal": "g", "value": 3.0, "target": ">= 1.5", "met": True}
    assert goal("g", 0.6, "<= 0.5")["met"] is False and goal("g", None, ">= 1")["met"] is False


def test_first_answers_identical_compares_same_prompts() -> None:
    recs = [_record("ours", 0, c, 0.0, [0.1], text=t) for c, t in enumerate(["x", "y", "z"])]
    recs += [_record("baseline", 0, c, 0.0, [0.1], text=t) for c, t in enumerate(["x", "q"])]
    recs.append(RequestRecord("ours", "chat", 0, 0, 1, 0.0, 8, chunk_s=[0.1], done_s=1.0, text="later turn"))
    assert first_answers_identical(recs, "ours", "baseline") == {"identical": 1, "compared": 2}


def test_clients_spread_over_processes_send_what_one_process_sends() -> None:
    """serving_client_procs: 3 closed-loop clients over 2 processes against a tiny-model server get, client by
    client and turn by turn, the greedy answers one process gets; times share one origin."""
    from model_fixtures import tiny_model
    from serving_client_procs import run_completions_procs

    from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
    from ultra_adaptive_kv_cache_engine.server.app import create_app
    from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
    from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

    lm = tiny_model()
    prompts = [f"prompt {i}" for i in range(6)]
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4096, block_size=4, max_memory=2 * 1024**2), model=lm)
    with BackgroundServer(create_app(engine, ServerConfig(), lm)) as server:
        runs = [run_completions_procs(server.url, lm.model_id, prompts, 5, 3, procs, "ours", "w", 0) for procs in (1, 2)]
    engine.close()
    answers = [{(r.client, r.turn): (r.text, r.completion_tokens) for r in records} for records in runs]
    assert all(r.ok for records in runs for r in records) and len(answers[0]) == 6
    assert answers[1] == answers[0] and sorted(answers[0]) == [(c, t) for c in range(3) for t in range(2)]
    assert all(r.done_s is not None and r.done_s >= r.sent_s >= 0 for r in runs[1])
    with pytest.raises(ValueError, match="procs=0"):
        run_completions_procs("http://127.0.0.1:1", "m", prompts, 5, 3, 0, "ours", "w", 0)
