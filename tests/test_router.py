"""`uakv route` (digest routing, the tiny model's tokenizer) in front of three in-thread `uakv serve` apps on
the tiny model, through the official `openai` client and httpx: prefix-aware routing (a conversation's turns go
where its prefix is, and are hits there), round robin, streams passed through, failover when an instance dies,
503 when none is left, the router's metrics and health; the prefix chunks and config validation in tiny
worlds."""

from __future__ import annotations

import argparse

import httpx
import openai
import pytest
from model_fixtures import tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cli import build_parser
from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
from ultra_adaptive_kv_cache_engine.router.commands import router_config_from_args
from ultra_adaptive_kv_cache_engine.router.prefixes import InstancePrefixes, chunk_digests, prompt_text
from ultra_adaptive_kv_cache_engine.router.tokens import PromptTokenizer
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer, bind_socket

MODEL = tiny_model().model_id
SYSTEM = "You answer questions about caches. " * 8  # 280 characters: two full prefix chunks of 128


class Instances:
    """Three tiny-model servers in threads, each with its own engine (its own pool)."""

    def __init__(self, n: int = 3) -> None:
        self.engines = [UltraAdaptiveKVCacheEngine(
            KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=6, max_memory=2 * 1024**2), model=tiny_model())
            for _ in range(n)]
        self.servers = [BackgroundServer(create_app(e, ServerConfig(), tiny_model())) for e in self.engines]
        for s in self.servers:
            s.__enter__()

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.servers)

    def close(self) -> None:
        for s in self.servers:
            if s.thread.is_alive():
                s.stop()
        for e in self.engines:
            e.close()


@pytest.fixture(scope="module")
def instances():
    fleet = Instances()
    yield fleet
    fleet.close()


def routed(urls: tuple[str, ...], **fields):
    fields.setdefault("health_interval_s", 0.2)
    config = RouterConfig(instances=urls, port=0, **fields)
    return BackgroundServer(create_router_app(config, PromptTokenizer(tiny_model().tokenizer)))


def chat(client: openai.OpenAI, messages: list[dict], **extra):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=6,
                                                           temperature=0, **extra)
    return raw.headers["x-uakv-instance"], raw.parse()


def test_a_conversation_goes_back_to_the_instance_holding_its_prefix(instances):
    with routed(instances.urls) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        where, sessions = {}, {}
        for user in ("alice", "bob", "carol", "dave"):
            messages = [{"role": "system", "content": f"{user}: {SYSTEM}"}, {"role": "user", "content": "What is KV?"}]
            where[user], first = chat(client, messages)
            sessions[user] = [*messages, {"role": "assistant", "content": first.choices[0].message.content}]
        assert len(set(where.values())) == 3  # new prompts spread over the least loaded instances
        for user, messages in sessions.items():
            again, answer = chat(client, [*messages, {"role": "user", "content": "And a block?"}])
            assert again == where[user]
            assert answer.usage.prompt_tokens_details.cached_tokens > 0
        health = httpx.get(f"{router.url}/health").json()
        assert health["status"] == "ok" and sum(i["routed"] for i in health["instances"]) == 8
        metrics = httpx.get(f"{router.url}/metrics").text
        assert 'uakv_router:decisions_total{decision="cache"} 4.0' in metrics


def test_round_robin_takes_turns(instances):
    with routed(instances.urls, policy="round_robin") as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        seen = [chat(client, [{"role": "user", "content": "same prompt every time"}])[0] for _ in range(6)]
        assert seen == list(instances.urls) * 2


def test_streams_pass_through_chunk_by_chunk(instances):
    messages = [{"role": "user", "content": "Stream me something"}]
    with routed(instances.urls) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
        _, whole = chat(client, messages)
        stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                stream=True)
        chunks = list(stream)
        assert len(chunks) > 2
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
        models = client.models.list()
        assert [m.id for m in models.data] == [MODEL]


def test_errors_of_an_instance_pass_through_and_the_router_answers_its_own():
    fleet = Instances(1)
    try:
        with routed(fleet.urls, max_body_bytes=200) as router:
            client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.NotFoundError, match="does not exist"):
                client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
            big = httpx.post(f"{router.url}/v1/completions", json={"model": MODEL, "prompt": "x" * 500})
            assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    finally:
        fleet.close()


def test_a_dead_instance_is_skipped_and_none_left_is_503():
    fleet = Instances(2)
    try:
        with routed(fleet.urls, policy="round_robin", health_interval_s=600) as router:  # one check, at start
            client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
            fleet.servers[0].stop()  # the router learns it from the request it sends there: then the next
            served = [chat(client, [{"role": "user", "content": f"question {i}"}])[0] for i in range(4)]
            assert served == [fleet.urls[1]] * 4
            health = httpx.get(f"{router.url}/health").json()
            assert [i["healthy"] for i in health["instances"]] == [False, True]
            metrics = httpx.get(f"{router.url}/metrics").text
            assert f'uakv_router:upstream_errors_total{{instance="{fleet.urls[0]}"}} 1.0' in metrics
            assert "uakv_router:retries_total 1.0" in metrics
            assert f'uakv_router:instance_healthy{{instance="{fleet.urls[0]}"}} 0.0' in metrics
            fleet.servers[1].stop()
            with pytest.raises(openai.InternalServerError) as exc_info:
                chat(client, [{"role": "user", "content": "anyone?"}])
            assert exc_info.value.status_code == 503 and "no healthy instance" in str(exc_info.value)
    finally:
        fleet.close()


def test_prompt_text_and_chained_chunks():
    chat_body = {"messages": [{"role": "system", "content": "abc"}, {"role": "user",
                                                                     "content": [{"type": "text", "text": "de"}]}]}
    assert prompt_text(chat_body) == "system\x1fabc\x1euser\x1fde\x1e"
    assert prompt_text({"prompt": "hello"}) == "hello" and prompt_text(None) == "" and prompt_text({"x": 1}) == ""
    a, b = chunk_digests("aaaabbbbcc", 4), chunk_digests("aaaabbbbdd", 4)
    assert len(a) == 2 and a == b  # only full chunks are named
    assert chunk_digests("xaaabbbb", 4)[1] != a[1]  # a chunk's digest names its whole prefix
    prefixes = InstancePrefixes(3)
    prefixes.add(a)
    assert prefixes.matched(a) == 2 and prefixes.matched(chunk_digests("aaaacccc", 4)) == 1
    prefixes.add(chunk_digests("zzzzyyyy", 4))  # 4 digests > 3: the least recent (a's child) goes first
    assert prefixes.matched(a) == 1 and len(prefixes) == 3


def test_router_config_is_validated_and_has_one_option_per_field():
    with pytest.raises(ValueError, match="not a base URL"):
        RouterConfig(instances=("127.0.0.1:8000",))
    with pytest.raises(ValueError, match="twice"):
        RouterConfig(instances=("http://a:1", "http://a:1"))
    with pytest.raises(ValueError, match="cache_aware, least_loaded, round_robin"):
        RouterConfig(policy="nearest")
    with pytest.raises(ValueError, match="balance_rel"):
        RouterConfig(balance_rel=0.9)
    args = build_parser().parse_args(["route", "--instances", "http://127.0.0.1:1,http://127.0.0.1:2",
                                      "--policy", "least_loaded", "--balance-abs", "8", "--port", "0"])
    assert isinstance(args, argparse.Namespace)
    config = router_config_from_args(args)
    assert config.instances == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert (config.policy, config.balance_abs, config.port) == ("least_loaded", 8.0, 0)
    with pytest.raises(ValueError, match="empty"):
        create_router_app(RouterConfig())


def test_an_unreachable_instance_is_marked_down_by_its_health_check():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with routed((f"http://127.0.0.1:{port}",)) as router:
        deadline_checks = 0
        while httpx.get(f"{router.url}/health").status_code != 503 and deadline_checks < 100:
            deadline_checks += 1
            httpx.get(f"{router.url}/metrics")
        assert httpx.get(f"{router.url}/health").json()["instances"][0]["healthy"] is False
