"""Mooncake-schema traces: reading, validating, writing, and the synthetic workloads that use the schema."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ultra_adaptive_kv_cache_engine.policies.replay import (
    WORKLOADS,
    TraceRequest,
    WorkloadSpec,
    compile_trace,
    generate_workload,
    load_trace,
    save_trace,
)
from ultra_adaptive_kv_cache_engine.policies.replay.chain import BlockChainer

LINE = {"timestamp": 27482, "input_length": 1100, "output_length": 52, "hash_ids": [46, 47, 48]}


def test_load_reads_the_schema_and_skips_blank_lines(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(LINE) + "\n\n" + json.dumps({**LINE, "timestamp": 27490.5, "extra": 1}) + "\n")
    reqs = load_trace(path)
    assert reqs == [
        TraceRequest(27482.0, 1100, 52, (46, 47, 48)),
        TraceRequest(27490.5, 1100, 52, (46, 47, 48)),
    ]


def test_save_then_load_round_trips(tmp_path: Path):
    reqs = [TraceRequest(0.0, 10, 1, (1, 2)), TraceRequest(5.0, 3, 0, ("x",))]
    save_trace(reqs, tmp_path / "out.jsonl")
    assert load_trace(tmp_path / "out.jsonl") == reqs
    assert not (tmp_path / "out.jsonl.tmp").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"timestamp": -1}, "timestamp=-1"),
        ({"input_length": "7"}, "input_length='7'"),
        ({"output_length": None}, "output_length=None"),
        ({"hash_ids": [1, 2.5]}, r"hash_ids=\[1, 2.5\]"),
        ({"hash_ids": "12"}, "hash_ids='12'"),
    ],
)
def test_bad_fields_are_named_with_their_line(tmp_path: Path, change: dict, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(LINE) + "\n" + json.dumps({**LINE, **change}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
        load_trace(path)


def test_bad_json_and_missing_file(tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        load_trace(path)
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.jsonl")


def test_compile_refuses_more_ids_than_blocks():
    assert compile_trace([TraceRequest(0, 1025, 0, (1, 2, 3))]).blocks == 3
    assert compile_trace([TraceRequest(0, 2000, 0, (1,))]).blocks == 1  # uncacheable tail: allowed
    with pytest.raises(ValueError, match="request 0: 3 hash_ids but input_length=1024 needs at most 2 blocks"):
        compile_trace([TraceRequest(0, 1024, 0, (1, 2, 3))])


def test_chainer_names_equal_prefixes_equally():
    c = BlockChainer(block_tokens=4)
    a, b, d = c.segment(6), c.segment(3), c.segment(5)
    assert c.hash_ids([a, b]) == (0, 1, 2)  # [a0:4] [a4:6 b0:2] [b2:3] (partial)
    assert c.hash_ids([a, d]) == (0, 3, 4)  # same first block, then diverges
    assert c.hash_ids([a, b, d]) == (0, 1, 5, 6)  # block 2 is now full: not the partial block 2 above
    assert c.hash_ids([a, b]) == (0, 1, 2)
    with pytest.raises(ValueError, match="tokens=0"):
        c.segment(0)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_workloads_are_deterministic_and_prefix_chained(name: str):
    spec = WorkloadSpec(requests=300, seed=3)
    reqs = generate_workload(name, spec)
    assert reqs == generate_workload(name, spec)
    assert reqs != generate_workload(name, WorkloadSpec(requests=300, seed=4))
    assert len(reqs) == 300 and compile_trace(reqs).requests == 300
    assert [r.timestamp for r in reqs] == sorted(r.timestamp for r in reqs)
    prefix_of: dict[int, tuple[int, ...]] = {}
    for r in reqs:
        assert len(r.hash_ids) == -(-r.input_length // 512)
        for i, block in enumerate(r.hash_ids):
            assert prefix_of.setdefault(block, r.hash_ids[:i]) == r.hash_ids[:i]


def test_chat_turns_extend_the_previous_prompt():
    reqs = generate_workload("chat", WorkloadSpec(requests=200, seed=1))
    seen = {r.hash_ids[:-1] for r in reqs}
    extended = sum(1 for r in reqs if any(r.hash_ids[: i] in seen for i in range(2, len(r.hash_ids))))
    assert extended > 50


def test_unknown_workload_and_bad_spec():
    with pytest.raises(ValueError, match="unknown workload 'web'; expected one of: agent, chat, mix, rag, system"):
        generate_workload("web")
    with pytest.raises(ValueError, match="requests=0"):
        WorkloadSpec(requests=0)
