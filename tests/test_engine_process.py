"""The engine's `process` action on a tiny random Llama: text and chat in, text out, prefix reuse."""

from __future__ import annotations

import asyncio

import pytest

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.model.tiny import build_tiny_llama

FIELDS = {"action", "text", "cache_hit", "cached_tokens", "prompt_tokens", "completion_tokens", "ttft_ms",
          "latency_ms", "finish_reason"}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llama()


@pytest.fixture
def engine(tiny) -> UltraAdaptiveKVCacheEngine:
    return UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=6, max_memory=2 * 1024**2), model=tiny)


def run(engine, request):
    return asyncio.run(engine.process_request(request))


def test_same_request_twice_hits_and_gives_the_same_text(engine):
    first = run(engine, {"text": "The quick brown fox", "action": "process"})
    second = run(engine, {"text": "The quick brown fox", "action": "process"})
    assert set(first) == FIELDS and first["cache_hit"] is False and first["cached_tokens"] == 0
    assert second["cache_hit"] is True and second["text"] == first["text"]
    prompt = first["prompt_tokens"]
    assert second["prompt_tokens"] == prompt and second["cached_tokens"] == min(prompt - 1, (prompt // 4) * 4)
    assert first["completion_tokens"] == 6 and first["ttft_ms"] <= first["latency_ms"]


def test_multi_turn_chat_reuses_the_previous_turn(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    turn1 = run(engine, {"messages": messages})
    messages += [{"role": "assistant", "content": turn1["text"]}, {"role": "user", "content": "And then?"}]
    turn2 = run(engine, {"messages": messages})
    assert turn2["cached_tokens"] >= (turn1["prompt_tokens"] // 4) * 4 > 0
    assert turn2["prompt_tokens"] > turn1["prompt_tokens"]


def test_raw_text_and_stop_strings(engine, tiny):
    out = run(engine, {"text": "abc", "raw": True, "max_new_tokens": 4})
    assert out["prompt_tokens"] == 3
    full = run(engine, {"text": "Tell me", "max_new_tokens": 8})["text"]
    if len(full) >= 2:  # the tiny model's text is arbitrary bytes; stop at its second character
        stopped = run(engine, {"text": "Tell me", "max_new_tokens": 8, "stop": full[1]})
        assert stopped["text"] == full[: full.index(full[1])]


def test_concurrent_requests_are_all_answered_correctly(engine, tiny):
    prompts = [f"question number {i}" for i in range(6)]
    alone = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=6, max_memory=2 * 1024**2), model=tiny)
    expected = [run(alone, {"text": p})["text"] for p in prompts]

    async def all_at_once():
        return await asyncio.gather(*(engine.process_request({"text": p}) for p in prompts))

    got = asyncio.run(all_at_once())
    assert [g["text"] for g in got] == expected


@pytest.mark.parametrize(
    ("request_", "match"),
    [
        ({"action": "process", "text": ""}, "field 'text' is empty"),
        ({"action": "process", "text": "   "}, "field 'text' is empty"),
        ({"action": "process"}, "needs the field 'text' or 'messages'"),
        ({"action": "process", "text": 5}, "field 'text' must be a string, got int"),
        ({"text": "hi", "max_new_tokens": 0}, "max_new_tokens=0 is out of range"),
        ({"text": "hi", "max_new_tokens": 10**6}, "max_new_tokens=1000000 is out of range"),
        ({"text": "hi", "temperature": -1}, "temperature=-1 is out of range"),
        ({"text": "hi", "top_p": 0}, "top_p=0 is out of range"),
        ({"text": "hi", "stop": [""]}, "stop=\\[''\\] must be a non-empty string"),
        ({"text": "hi", "seed": -3}, r"seed=-3 must be an integer from 0 to 2\*\*64 - 1"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages\\[0\\].role='robot' is not valid"),
        ({"messages": [{"role": "user"}]}, "must be a dict with keys 'role' and 'content'"),
        ({"messages": "hello"}, "field 'messages' must be a non-empty list"),
        ({"text": "x" * 600}, "exceeds the model's context of 512 tokens"),
    ],
)
def test_bad_requests_raise_and_cache_survives(engine, request_, match):
    ok = run(engine, {"text": "keep me cached"})
    with pytest.raises(ValueError, match=match):
        run(engine, request_)
    again = run(engine, {"text": "keep me cached"})
    assert again["cache_hit"] is True and again["text"] == ok["text"]


def test_unknown_model_path_is_a_clear_error(tmp_path):
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(model_path=str(tmp_path / "nowhere")))
    with pytest.raises((ValueError, FileNotFoundError), match="nowhere"):
        run(engine, {"text": "hi"})


def test_describe_names_model_and_sizes(engine):
    info = engine.describe()
    assert info["model"]["id"].startswith("tiny-llama") and info["kv"]["block_size"] == 4
    # 2 MiB of 2 KiB blocks: the pool is sized by max_memory; max_tokens is the tensor store's alone
    assert info["kv"]["pool_blocks"] == 1024 and info["kv"]["bytes_per_block"] == 2048
    assert info["config"]["max_tokens"] == 4096


def test_scheduler_sizes_come_from_the_config(tiny):
    config = KVCacheConfig(block_size=4, max_new_tokens=3, max_memory=2 * 1024**2, max_running=3, max_step_tokens=40,
                           max_waiting=5, model_backend="paged_llama", cuda_graphs=False)
    with UltraAdaptiveKVCacheEngine(config, model=tiny) as engine:
        assert run(engine, {"text": "hello"})["completion_tokens"] == 3
        sc = engine._session.scheduler_config
        assert (sc.max_running, sc.max_step_tokens, sc.max_waiting, sc.backend, sc.cuda_graphs) == (3, 40, 5, "paged_llama", False)
        assert engine.get_stats()["model"]["backend"] == "paged_llama"
