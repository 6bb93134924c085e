"""CI-size run of benchmarks/bench_faults.py: kill -9 rounds per disk layout and with Redis, forged Redis records,
fuzzed records and requests, with exact zero counts of lost, corrupt, forged and crashing cases."""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import pytest
from redis_server import RedisServer, redis_or_skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
bench = pytest.importorskip("bench_faults")


@pytest.mark.parametrize("layout", ["files", "segments"])
def test_kill_9_rounds_lose_and_corrupt_nothing_on_disk(layout: str) -> None:
    got = bench.kill_rounds(layout, 12, None, random.Random(1))
    assert (got["rounds"], got["lost"], got["corrupt_served"]) == (12, 0, 0)


def test_kill_9_rounds_and_forgeries_against_redis(tmp_path: Path) -> None:
    redis_or_skip()
    server = RedisServer.start(tmp_path / "redis")
    try:
        got = bench.kill_rounds("redis", 8, server.url, random.Random(2))
        assert (got["rounds"], got["lost"], got["corrupt_served"]) == (8, 0, 0)
        forged = bench.forged_rounds(server.url, 40, random.Random(3))
        assert forged == {"forged_written": 60, "forged_served": 0}
    finally:
        server.stop()
        shutil.rmtree(tmp_path / "redis", ignore_errors=True)


def test_fuzzed_records_and_requests_only_raise_documented_errors() -> None:
    assert bench.fuzz_records(1500, random.Random(4)) == {
        "records_fuzzed": 3000, "record_crashes": 0, "record_accepted_wrong": 0}
    assert bench.fuzz_requests(3000, random.Random(5)) == {"requests_fuzzed": 3000, "request_crashes": 0}


def test_hypothesis_mutated_records_are_exact_or_refused() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from ultra_adaptive_kv_cache_engine.tiers import RecordError, parse_record

    record = bench.encode_block(bench.key_of(7), bench.NS, bench.tensor_of(7), bench.CODEC)
    good = record.to_bytes()

    @settings(max_examples=300, deadline=None, derandomize=True)
    @given(st.integers(0, len(good) - 1), st.integers(1, 255), st.integers(0, len(good)))
    def check(at: int, xor: int, cut: int) -> None:
        data = bytearray(good)
        data[at] ^= xor
        for candidate in (bytes(data), good[:cut]):
            try:
                got = parse_record(candidate, record.block_hash, bench.NS)
            except RecordError:
                continue
            assert got.to_bytes() == good

    check()
