"""The tensor store's snapshot never loses a persisted entry: engines that persist without loading, live
engines sharing a folder (one process and two), evictions, capacity after a merge, the folder lock, kill -9,
and `load()` without the model."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cache.folder_lock import FolderLock, FolderLockedError
from ultra_adaptive_kv_cache_engine.cache.keys import tensor_digest
from ultra_adaptive_kv_cache_engine.cache.shared_snapshot import SharedSnapshot
from ultra_adaptive_kv_cache_engine.cache.tensor_file import load_snapshot, snapshot_path

SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def kv(seed: int, tokens: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, 4, generator=g)


def engine_on(folder: Path, max_tokens: int = 64) -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(max_tokens=max_tokens, cache_strategy="lru", enable_persistence=True,
                           persistence_path=str(folder))
    return UltraAdaptiveKVCacheEngine(config)


_SEEDS: dict[bytes, int] = {}


def seeds(digests: object) -> set[int]:
    """The seeds i of the keys kv(i), i < 1000, named by `digests`."""
    if not _SEEDS:
        _SEEDS.update({tensor_digest(kv(i)): i for i in range(1000)})
    found = set(digests)  # type: ignore[call-overload]
    assert found <= set(_SEEDS)
    return {_SEEDS[d] for d in found}


def on_disk(folder: Path) -> set[int]:
    """Seeds of the keys in the folder's snapshot."""
    return seeds(load_snapshot(snapshot_path(folder, ""), "")[0])


def held(engine: UltraAdaptiveKVCacheEngine) -> set[int]:
    return seeds(engine.cache.snapshot())


# --------------------------------------------------------------------------------------------- bug 1: data loss
def test_an_engine_persisting_without_load_keeps_what_another_persisted(tmp_path: Path) -> None:
    a = engine_on(tmp_path)
    a.store(kv(1), kv(101))
    assert a.persist()["tensor_entries"] == 1
    b = engine_on(tmp_path)  # never calls load()
    b.store(kv(2), kv(102))
    written = b.persist()
    assert written["tensor_entries"] == 2 and written["tensor_merged"] == 1
    c = engine_on(tmp_path)
    assert c.load()["tensor_entries"] == 2
    assert torch.equal(c.retrieve(kv(1)), kv(101)) and torch.equal(c.retrieve(kv(2)), kv(102))
    assert held(b) == {1, 2}  # the merge is a load: B now holds A's entry too


def test_two_live_engines_in_one_process_persisting_in_turn(tmp_path: Path) -> None:
    a, b = engine_on(tmp_path), engine_on(tmp_path)
    a.store(kv(1), kv(101))
    b.store(kv(2), kv(102))
    a.persist()
    b.persist()
    a.store(kv(3), kv(103))
    a.persist()
    assert on_disk(tmp_path) == {1, 2, 3} and held(a) == {1, 2, 3} and held(b) == {1, 2}


def test_an_engines_own_eviction_leaves_the_snapshot_and_is_not_undone(tmp_path: Path) -> None:
    a = engine_on(tmp_path)
    for i in range(3):
        a.store(kv(i), kv(100 + i))
    a.persist()
    a.cache.evict(2)  # LRU: drops kv(0)
    written = a.persist()
    assert written["tensor_merged"] == 0 and on_disk(tmp_path) == {1, 2} and held(a) == {1, 2}


def test_another_engines_rewrite_of_an_entry_i_evicted_survives_my_persist(tmp_path: Path) -> None:
    a, b = engine_on(tmp_path), engine_on(tmp_path)
    a.store(kv(1), kv(101))
    a.persist()
    b.load()
    a.cache.evict(2)  # A drops kv(1)...
    b.store(kv(1), kv(101))  # ...while B stores it again (a new write, acknowledged by B's persist)
    b.persist()
    assert a.persist()["tensor_merged"] == 1
    assert on_disk(tmp_path) == {1}


def test_an_entry_held_unchanged_is_dropped_when_a_reader_evicts_it(tmp_path: Path) -> None:
    a, b = engine_on(tmp_path), engine_on(tmp_path)
    a.store(kv(1), kv(101))
    a.persist()
    b.load()
    b.cache.evict(2)  # B read A's write and evicted it: an eviction, not a loss
    b.persist()
    assert on_disk(tmp_path) == set()
    a.persist()  # A still holds it: A's next persist writes it again
    assert on_disk(tmp_path) == {1}


def test_capacity_holds_after_a_merge_and_the_merge_evicts_through_the_policy(tmp_path: Path) -> None:
    a = engine_on(tmp_path, max_tokens=6)  # three 2-token entries
    for i in (1, 2):
        a.store(kv(i), kv(100 + i))
    a.persist()
    b = engine_on(tmp_path, max_tokens=6)
    for i in (3, 4):
        b.store(kv(i), kv(100 + i))
    written = b.persist()  # restores 1 (fits), then 2 evicts the least recent of B's: 3
    assert written["tensor_merged"] == 2 and written["tensor_entries"] == 3
    assert held(b) == {1, 2, 4} and b.cache.num_tokens == 6 and b.cache.stats()["evictions"] == 1
    assert on_disk(tmp_path) == {1, 2, 4}


def test_random_sequences_of_open_store_persist_and_drop_lose_no_persisted_entry(tmp_path: Path) -> None:
    rng = random.Random(7)
    for round_ in range(8):
        folder = tmp_path / f"round{round_}"
        live: list[tuple[UltraAdaptiveKVCacheEngine, set[int]]] = []  # engine, entries stored since its persist
        acknowledged: set[int] = set()
        next_key = 0
        for _ in range(40):
            op = rng.choice(["open", "store", "store", "persist", "load", "drop"]) if live else "open"
            if op == "open":
                live.append((engine_on(folder, max_tokens=1000), set()))
            elif op == "drop":  # the engine dies: what it did not persist is not acknowledged
                live.pop(rng.randrange(len(live)))
            else:
                engine, pending = live[rng.randrange(len(live))]
                if op == "store":
                    engine.store(kv(next_key), kv(500 + next_key))
                    pending.add(next_key)
                    next_key += 1
                elif op == "persist":
                    engine.persist()
                    acknowledged |= pending
                    pending.clear()
                else:
                    engine.load()
            if acknowledged:
                assert acknowledged <= on_disk(folder)
        final = engine_on(folder, max_tokens=1000)
        final.load()
        assert acknowledged <= held(final)
        assert all(torch.equal(final.retrieve(kv(i)), kv(500 + i)) for i in acknowledged)


def test_an_untrusted_snapshot_is_set_aside_by_persist_and_never_served(tmp_path: Path) -> None:
    a = engine_on(tmp_path)
    a.store(kv(1), kv(101))
    a.persist()
    path = snapshot_path(tmp_path, "")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    b = engine_on(tmp_path)
    b.store(kv(2), kv(102))
    assert b.load()["snapshots_rejected"] == 1 and path.exists()  # load leaves the file as it is
    assert b.persist()["tensor_entries"] == 1
    assert on_disk(tmp_path) == {2} and path.with_name(path.name + ".rejected").read_bytes() == bytes(data)


def test_a_version_1_snapshot_is_still_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from ultra_adaptive_kv_cache_engine.cache import tensor_file

    named = {tensor_digest(kv(1)).hex(): kv(101)}
    metadata = {"format": tensor_file.FORMAT, "version": "1", "checksum": tensor_file._checksum(named, None),
                "tenant": tensor_file._tenant("")}
    save_file(named, str(snapshot_path(tmp_path, "")), metadata=metadata)
    engine = engine_on(tmp_path)
    assert engine.load()["tensor_entries"] == 1 and torch.equal(engine.retrieve(kv(1)), kv(101))
    engine.store(kv(2), kv(102))
    engine.persist()
    assert on_disk(tmp_path) == {1, 2}


# ----------------------------------------------------------------------------------- bug 2: two processes
WRITER = textwrap.dedent(
    """
    import sys, torch
    from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
    folder, first, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = KVCacheConfig(max_tokens=100000, cache_strategy="lru", enable_persistence=True,
                           persistence_path=folder)
    engine = UltraAdaptiveKVCacheEngine(config)
    for i in range(first, first + count):
        g = torch.Generator().manual_seed(i)
        key = torch.randn(1, 2, 4, generator=g)
        engine.store(key, key * 2)
        engine.persist()
        print(i, flush=True)  # acknowledged: persist() returned
    """
)


def writer(folder: Path, first: int, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(first), str(count)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_persisting_to_one_folder_at_once_lose_nothing(tmp_path: Path) -> None:
    child = writer(tmp_path, 0, 30)
    engine = engine_on(tmp_path, max_tokens=100000)
    for i in range(100, 130):
        engine.store(kv(i), kv(i) * 2)
        engine.persist()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert [int(x) for x in out.split()] == list(range(30))
    assert on_disk(tmp_path) == set(range(30)) | set(range(100, 130))
    final = engine_on(tmp_path, max_tokens=100000)
    final.load()
    assert all(torch.equal(final.retrieve(kv(i)), kv(i) * 2) for i in [*range(30), *range(100, 130)])


def test_kill_minus_nine_mid_persist_never_loses_or_tears_an_acknowledged_entry(tmp_path: Path) -> None:
    engine = engine_on(tmp_path, max_tokens=100000)
    engine.store(kv(900), kv(900) * 2)
    engine.persist()
    child = writer(tmp_path, 0, 10_000)
    acknowledged: list[int] = []
    assert child.stdout is not None
    for line in child.stdout:  # kill it at a seeded point of its stream of persists
        acknowledged.append(int(line))
        if len(acknowledged) == 37:
            break
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    engine.store(kv(901), kv(901) * 2)
    engine.persist()  # the dead writer's lock was released by the kernel; its temporary file is removed
    assert not list(tmp_path.glob(".*.tmp"))
    assert set(acknowledged) | {900, 901} <= on_disk(tmp_path)


HOLDER = textwrap.dedent(
    """
    import sys
    from ultra_adaptive_kv_cache_engine.cache.folder_lock import FolderLock
    with FolderLock(sys.argv[1]).hold():
        print("held", flush=True)
        sys.stdin.read()  # until the parent closes our stdin (or kills us)
    """
)


def test_a_folder_locked_by_another_process_is_a_clear_error_naming_it_and_the_pid(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], env=ENV, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        snapshot = SharedSnapshot(tmp_path, lock=FolderLock(tmp_path, timeout_s=0))
        cache = engine_on(tmp_path).cache
        cache.store(kv(1), kv(101))
        with pytest.raises(FolderLockedError, match=rf"folder {tmp_path} is locked by pid {holder.pid} "):
            snapshot.persist(cache)
        holder.kill()  # the kernel releases a dead holder's lock
        holder.wait(timeout=60)
        assert snapshot.persist(cache).entries == 1
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert FolderLock(tmp_path).holder() is None  # released, and its pid cleared


def test_the_folder_lock_excludes_another_engine_of_the_same_process(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path, timeout_s=0)
    with lock.hold():
        with pytest.raises(FolderLockedError, match=rf"pid {os.getpid()} \(this process"):
            with FolderLock(tmp_path, timeout_s=0).hold():
                pass
    with FolderLock(tmp_path, timeout_s=0).hold():  # free again
        assert FolderLock(tmp_path).holder() == os.getpid()


# -------------------------------------------------------------------------------- bug 3: load() without the model
def test_load_restores_the_tensor_store_without_loading_the_model(tmp_path: Path) -> None:
    a = engine_on(tmp_path)
    a.store(kv(1), kv(101))
    a.persist()
    fresh = engine_on(tmp_path)
    assert fresh.load() == {"tensor_entries": 1, "snapshots_rejected": 0, "kv_blocks_on_disk": 0}
    assert fresh._session is None and torch.equal(fresh.retrieve(kv(1)), kv(101))


@pytest.mark.parametrize("layout", ["files", "segments"])
def test_kv_blocks_on_disk_are_counted_before_and_warm_started_at_the_first_process(tmp_path: Path,
                                                                                      layout: str) -> None:
    from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama

    tiny = build_tiny_llama()
    config = KVCacheConfig(max_tokens=1024, block_size=4, enable_persistence=True, persistence_path=str(tmp_path),
                           disk_layout=layout)
    prompt = {"text": "A shared system prompt that is long enough to fill several blocks.", "max_new_tokens": 4}
    with UltraAdaptiveKVCacheEngine(config, model=tiny) as engine:
        first = asyncio.run(engine.process_request(prompt))
        written = engine.persist()
    assert written["kv_blocks"] > 0
    fresh = UltraAdaptiveKVCacheEngine(config, model=tiny)
    assert fresh.load()["kv_blocks_on_disk"] == written["kv_blocks"] and fresh._session is None
    again = asyncio.run(fresh.process_request(prompt))
    assert again["cache_hit"] is True and again["text"] == first["text"]
    fresh.close()


def test_the_census_counts_every_namespace_and_ignores_temporary_files(tmp_path: Path) -> None:
    from ultra_adaptive_kv_cache_engine.cache.disk_census import count_kv_blocks

    for ns, names in (("a" * 64, ["0" * 64, "0" + "1" * 63]), ("b" * 64, ["2" * 64])):
        for name in names:
            shard = tmp_path / ns / name[:2]
            shard.mkdir(parents=True, exist_ok=True)
            (shard / f"{name}.blk").write_bytes(b"x")
            (shard / f"{name}.blk.tmp-1-2-3").write_bytes(b"x")
    (tmp_path / "not-a-namespace" / "00").mkdir(parents=True)
    (tmp_path / "not-a-namespace" / "00" / f"{'3' * 64}.blk").write_bytes(b"x")
    assert count_kv_blocks(tmp_path) == 3 and count_kv_blocks(tmp_path / "missing") == 0
