"""`GET /v1/cache/digest` on a real tiny-model server over HTTP: its exact content after known requests (full and
`since` deltas, evictions, a restart warm from disk), the API key, malformed queries; `CacheDigest` and
`KVCacheManager.held_blocks` in tiny worlds."""

from __future__ import annotations

import httpx
import pytest
from model_fixtures import tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cache.results import HeldBlocks
from ultra_adaptive_kv_cache_engine.prefix import hash_blocks
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.cache_digest import CacheDigest
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

MODEL = tiny_model().model_id
FIRST = "The cache holds blocks."  # 23 byte tokens: 5 full blocks of 4
SECOND = FIRST + " And then some more."  # 43 tokens: 10 full blocks, the first 5 shared


def make_engine(**fields) -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=1, max_memory=2 * 1024**2, **fields)
    return UltraAdaptiveKVCacheEngine(config, model=tiny_model())


@pytest.fixture
def served(request):
    engine = make_engine()
    with BackgroundServer(create_app(engine, ServerConfig(**getattr(request, "param", {})), tiny_model())) as server:
        yield engine, server.url
    engine.close()


def complete(url: str, prompt: str, **headers: str) -> None:
    answer = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                                       "temperature": 0}, headers=headers, timeout=60)
    assert answer.status_code == 200, answer.text


def digest(url: str, since: int | None = None) -> dict:
    answer = httpx.get(f"{url}/v1/cache/digest", params={} if since is None else {"since": since})
    assert answer.status_code == 200, answer.text
    return answer.json()


def names(engine: UltraAdaptiveKVCacheEngine, prompt: str) -> list[bytes]:
    return hash_blocks(tiny_model().tokenizer.encode(prompt), engine.cache_manager().namespace, 4)


def short(hashes) -> list[str]:
    return sorted(h[:8].hex() for h in hashes)


def test_the_digest_names_exactly_the_blocks_held_and_its_deltas_follow_each_change(served):
    engine, url = served
    manager = engine.cache_manager()
    empty = digest(url)
    g = empty["generation"]
    assert empty == {"object": "cache.digest", "instance": empty["instance"], "model": MODEL,
                     "namespace": manager.namespace.digest.hex(), "tokenizer": tiny_model().tokenizer.identity,
                     "block_size": 4, "hash_bytes": 8, "generation": g, "full": True, "blocks": [],
                     "pool": {"blocks": manager.num_blocks, "free": manager.num_blocks, "sequences": 0}}
    assert len(empty["instance"]) == 16 and int(empty["instance"], 16) >= 0

    complete(url, FIRST)
    first = digest(url, since=g)
    assert (first["full"], first["since"], first["generation"]) == (False, g, g + 1)
    assert first["added"] == short(names(engine, FIRST)) and len(first["added"]) == 5 and first["removed"] == []
    assert first["pool"] == {"blocks": manager.num_blocks, "free": manager.num_blocks, "sequences": 0}
    assert digest(url)["blocks"] == short(names(engine, FIRST)) and digest(url)["generation"] == g + 1
    unchanged = digest(url, since=g + 1)
    assert (unchanged["full"], unchanged["generation"], unchanged["added"], unchanged["removed"]) == (False, g + 1, [], [])

    complete(url, SECOND)
    second = digest(url, since=g + 1)
    own = names(engine, SECOND)[5:]
    assert second["generation"] == g + 2 and second["added"] == short(own) and second["removed"] == []
    assert digest(url, since=g)["added"] == short(names(engine, SECOND))  # two changes composed

    assert manager.evict_blocks(own[2:]) == 3
    evicted = digest(url, since=g + 2)
    assert (evicted["generation"], evicted["added"], evicted["removed"]) == (g + 3, [], short(own[2:]))
    assert digest(url, since=g)["added"] == short(names(engine, SECOND)[:7])  # added then removed: never named

    for stale in (0, g - 1, g + 1000):  # before the kept differences, or from the future: the whole set
        whole = digest(url, since=stale)
        assert whole["full"] is True and whole["blocks"] == short(names(engine, SECOND)[:7]) and "since" not in whole


def test_a_restarted_instance_reports_what_its_disk_holds_under_a_new_instance_id(tmp_path):
    fields = {"enable_persistence": True, "persistence_path": str(tmp_path), "cpu_tier_bytes": 0}
    engine = make_engine(**fields)
    with BackgroundServer(create_app(engine, ServerConfig(), tiny_model())) as server:
        complete(server.url, FIRST)
        before = digest(server.url)
    engine.persist()
    engine.close()
    engine = make_engine(**fields)
    try:
        with BackgroundServer(create_app(engine, ServerConfig(), tiny_model())) as server:
            after = digest(server.url, since=before["generation"])
            assert after["instance"] != before["instance"] and after["generation"] > before["generation"]
            assert after["full"] is True and after["blocks"] == short(names(engine, FIRST))  # from disk
            held = engine.cache_manager().held_blocks()
            assert held.pool == () and sorted(held.local_tiers) == sorted(names(engine, FIRST))
    finally:
        engine.close()


@pytest.mark.parametrize("served", [{"api_key": "digest-key"}], indirect=True)
def test_the_digest_is_behind_the_api_key(served):
    _, url = served
    for headers in ({}, {"authorization": "Bearer wrong"}):
        refused = httpx.get(f"{url}/v1/cache/digest", headers=headers)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/v1/cache/digest", headers={"authorization": "Bearer digest-key"}).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200


def test_malformed_queries_are_400_naming_the_parameter(served):
    _, url = served
    for value in ("abc", "-1", "1.5", "", "0x10", " 7", "\uff17"):  # the last: a full-width digit 7
        answer = httpx.get(f"{url}/v1/cache/digest", params={"since": value})
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["param"] == "since" and repr(value) in error["message"]
    twice = httpx.get(f"{url}/v1/cache/digest?since=1&since=2")
    assert twice.status_code == 400 and twice.json()["error"]["param"] == "since"
    unknown = httpx.get(f"{url}/v1/cache/digest?since=1&blocks=all")
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "blocks"
    assert "expected: since" in unknown.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/cache/digest").status_code == 405


def test_cache_digest_generations_and_history_in_a_tiny_world():
    state = {"pool": (b"a" * 32,), "tiers": (b"a" * 32, b"b" * 32)}
    digest = CacheDigest(lambda: HeldBlocks(state["pool"], state["tiers"], 11, 7, 1),
                         tiny_engine_namespace(), "m", hash_bytes=4, history=2, first_generation=100)
    full = digest.report()
    assert (full["generation"], full["blocks"], full["pool"]) == (101, ["61616161", "62626262"],
                                                                 {"blocks": 11, "free": 7, "sequences": 1})
    state["tiers"] = ()
    assert digest.report(since=101)["removed"] == ["62626262"]
    state["pool"] = (b"c" * 32,)
    delta = digest.report(since=102)
    assert (delta["generation"], delta["added"], delta["removed"]) == (103, ["63636363"], ["61616161"])
    assert digest.report(since=101)["full"] is False  # two differences kept: 102 and 103
    state["pool"] = ()
    assert digest.report(since=101)["full"] is True  # 102 was forgotten (history=2)
    with pytest.raises(ValueError, match="hash_bytes=3"):
        CacheDigest(lambda: HeldBlocks((), (), 1, 1, 0), tiny_engine_namespace(), "m", hash_bytes=3)


def tiny_engine_namespace():
    lm = tiny_model()
    return lm.namespace(lm.kv_spec(4))
