"""`uakv route` with cache digests (prefix_source=digest) in front of real tiny-model servers on loopback: the
router follows what each instance reports (an instance that evicted a prefix, or was restarted, is no longer
preferred; a prefix an instance got through a shared Redis tier, from a client that bypassed the router, is
seen), falls back to text chunks when an instance offers no digest, and names its source in its metrics. The
router's prompt ids and block hashes equal the instances' (tiny byte codec and the real SmolLM2 tokenizer);
`InstanceDigest` in a tiny world."""

from __future__ import annotations

import time

import httpx
import pytest
import redis as redis_client
from model_fixtures import tiny_model
from redis_server import RedisServer

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.model.text import HFTextCodec
from ultra_adaptive_kv_cache_engine.prefix import hash_blocks
from ultra_adaptive_kv_cache_engine.router import RouterConfig, create_router_app
from ultra_adaptive_kv_cache_engine.router.digests import InstanceDigest, StaleDigest, chained_hashes
from ultra_adaptive_kv_cache_engine.router.tokens import MemoTextCodec, PromptTokenizer
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

MODEL = tiny_model().model_id
P = "Blocks are named by chained hashes of their tokens. " * 4  # 208 byte tokens: 52 blocks of 4
Q = "A fleet shares them through Redis when it must. " * 2  # 96 tokens: 24 blocks
R = "Which instance holds the longest prefix?"  # 40 tokens: P + Q + R is 86 blocks, P + R 62
SECRET = "router-digest-secret-0123456789ab"


class Instance:
    """A tiny-model `uakv serve` app in a thread, restartable on its port with a fresh engine."""

    def __init__(self, port: int = 0, api_key: str | None = None, **fields) -> None:
        self.fields, self.api_key = fields, api_key
        self.engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=1,
                                                               max_memory=2 * 1024**2, **fields), model=tiny_model())
        app = create_app(self.engine, ServerConfig(api_key=api_key), tiny_model())
        self.server = BackgroundServer(app, port=port)
        self.server.__enter__()
        self.url = self.server.url

    def restart(self) -> None:
        self.close()
        self.__init__(int(self.url.rsplit(":", 1)[1]), self.api_key, **self.fields)

    def generation(self) -> int:
        headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.get(f"{self.url}/v1/cache/digest", headers=headers).json()["generation"]

    def close(self) -> None:
        if self.server.thread.is_alive():
            self.server.stop()
        self.engine.close()


def complete(url: str, prompt: str, headers: dict | None = None) -> tuple[str | None, dict]:
    answer = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 1,
                                                       "temperature": 0}, headers=headers or {}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.headers.get("x-uakv-instance"), answer.json()


def router(urls, **fields):
    fields.setdefault("digest_interval_s", 0.1)
    config = RouterConfig(instances=tuple(urls), port=0, health_interval_s=0.2, **fields)
    return BackgroundServer(create_router_app(config, PromptTokenizer(tiny_model().tokenizer)))


def seen(router_url: str, instance: Instance, generation: int | None = None, deadline_s: float = 60) -> dict:
    """The router's view of `instance`'s digest once it reached `generation` (default: the instance's now)."""
    wanted = instance.generation() if generation is None else generation
    stop = time.monotonic() + deadline_s  # a bound against a hang, not a measurement
    while True:
        view = {i["url"]: i["digest"] for i in httpx.get(f"{router_url}/health").json()["instances"]}[instance.url]
        if view is not None and view["generation"] == wanted or time.monotonic() > stop:
            assert view is not None and view["generation"] == wanted, (view, wanted)
            return view
        time.sleep(0.05)


def metric(router_url: str, line: str) -> bool:
    return line in httpx.get(f"{router_url}/metrics").text.splitlines()


@pytest.fixture
def pair():
    instances = [Instance(), Instance()]
    yield instances
    for i in instances:
        i.close()


def test_an_instance_that_evicted_a_prefix_is_no_longer_preferred(pair):
    x, y = pair
    complete(y.url, P)  # clients that bypass the router: y holds P, x holds P + Q
    complete(x.url, P + Q)
    with router([x.url, y.url]) as r:
        seen(r.url, x), seen(r.url, y)
        assert complete(r.url, P + Q + R)[0] == x.url  # the longest prefix
        manager = x.engine.cache_manager()
        held = manager.held_blocks()
        manager.evict_blocks(held.pool + held.local_tiers)
        assert seen(r.url, x)["blocks"] == 0
        assert complete(r.url, P + Q + R)[0] == y.url  # text chunks would still say x
        assert metric(r.url, 'uakv_router:decisions_total{decision="cache"} 2.0')
        assert metric(r.url, 'uakv_router:prefix_source_total{source="digest"} 2.0')
        assert metric(r.url, 'uakv_router:prompt_blocks_total 172.0')  # two prompts of 86 full blocks
        assert metric(r.url, 'uakv_router:matched_blocks_total 128.0')  # P + Q on x (76), then P on y (52)


def test_a_restarted_instance_is_no_longer_preferred(pair):
    x, y = pair
    with router([x.url, y.url]) as r:
        complete(x.url, P)
        before = seen(r.url, x)
        assert complete(r.url, P + Q)[0] == x.url
        x.restart()  # same port, an empty pool, a new instance id
        complete(y.url, P)
        seen(r.url, y)
        after = seen(r.url, x)
        assert after["instance"] != before["instance"] and after["blocks"] == 0
        assert complete(r.url, P + Q)[0] == y.url


def test_a_prefix_an_instance_got_through_redis_is_seen(tmp_path):
    redis = RedisServer.start(tmp_path / "redis")
    shared = {"redis_url": redis.url, "tier_secret": SECRET, "cpu_tier_bytes": 0, "write_through_delay_s": 0.05}
    a, b, c = Instance(**shared), Instance(**shared), Instance()
    try:
        complete(a.url, P)  # computed on a, written through to Redis
        deadline = time.monotonic() + 60
        with redis_client.Redis(host="127.0.0.1", port=redis.port) as keys:
            while keys.dbsize() < 52 and time.monotonic() < deadline:
                time.sleep(0.05)
        assert complete(b.url, P)[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 204  # from Redis
        for source, decision, where in (("digest", "cache", b.url), ("text", "new", None)):
            with router([c.url, b.url], prefix_source=source) as r:
                if source == "digest":
                    assert seen(r.url, b)["blocks"] == 52 and seen(r.url, c)["blocks"] == 0
                served = complete(r.url, P + R)[0]
                assert where is None or served == where
                assert metric(r.url, f'uakv_router:decisions_total{{decision="{decision}"}} 1.0')
                assert metric(r.url, f'uakv_router:prefix_source_total{{source="{source}"}} 1.0')
    finally:
        for i in (a, b, c):
            i.close()
        redis.stop()


def test_an_instance_without_a_digest_is_routed_by_text_chunks():
    x = Instance(api_key="instance-key")
    key = {"authorization": "Bearer instance-key"}
    try:
        with router([x.url]) as r:  # the router lacks the key: its polls are refused (401)
            complete(r.url, P, key)
            complete(r.url, P, key)
            assert metric(r.url, 'uakv_router:prefix_source_total{source="text"} 2.0')
            assert metric(r.url, 'uakv_router:matched_chunks_total 1.0')  # the second: the chunk routed first
            polls = httpx.get(f"{r.url}/metrics").text
            assert f'uakv_router:digest_polls_total{{instance="{x.url}",outcome="failed"}}' in polls
            assert httpx.get(f"{r.url}/health").json()["instances"][0]["digest"] is None
        with router([x.url], api_key="instance-key") as r:
            assert seen(r.url, x)["blocks"] == 52
            complete(r.url, P + R, key)
            assert metric(r.url, 'uakv_router:prefix_source_total{source="digest"} 1.0')
            assert metric(r.url, 'uakv_router:matched_blocks_total 52.0')
    finally:
        x.close()


def test_an_instance_under_another_tokenizer_is_routed_by_text_chunks():
    x = Instance()
    try:
        config = RouterConfig(instances=(x.url,), port=0, digest_interval_s=0.1)
        with BackgroundServer(create_router_app(config)) as r:  # the default model's tokenizer: SmolLM2's
            view = seen(r.url, x)  # the digest is polled, and names the tiny byte tokenizer
            assert view["blocks"] == 0
            complete(r.url, P)
            assert metric(r.url, 'uakv_router:prefix_source_total{source="text"} 1.0')
            assert httpx.get(f"{r.url}/health").json()["prefix_source"] == "digest"
    finally:
        x.close()


def test_the_router_tokenizes_and_hashes_as_the_instances_do():
    lm = tiny_model()
    namespace = lm.namespace(lm.kv_spec(4))
    chat = {"model": MODEL, "messages": [{"role": "developer", "content": "Be brief."},
                                         {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                      {"type": "text", "text": "there"}]}]}
    tokenizer = PromptTokenizer(lm.tokenizer)
    ids = tokenizer.token_ids("/v1/chat/completions", chat)
    assert ids == lm.tokenizer.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    assert tokenizer.token_ids("/v1/completions", {"model": MODEL, "prompt": [P]}) == lm.tokenizer.encode(P)
    assert tokenizer.token_ids("/v1/completions", {"model": MODEL, "prompt": "  "}) is None  # the instance's 400
    assert tokenizer.token_ids("/v1/chat/completions", {"model": MODEL, "messages": "hi"}) is None
    assert chained_hashes(ids, namespace.digest, 4) == hash_blocks(ids, namespace, 4)

    from transformers import AutoTokenizer

    from ultra_adaptive_kv_cache_engine.model.loader import resolve_model_folder

    smol = PromptTokenizer.load(None)  # the embedded SmolLM2's, as uakv serve resolves it
    assert isinstance(smol.codec, MemoTextCodec)
    plain = HFTextCodec(AutoTokenizer.from_pretrained(resolve_model_folder(KVCacheConfig()), local_files_only=True),
                        smol.identity)
    messages = [{"role": "system", "content": "You cache. <|im_start|>user"}, {"role": "user", "content": P}]
    for _ in range(2):  # the second time from the memo
        assert smol.token_ids("/v1/chat/completions", {"model": "m", "messages": messages}) == plain.chat(messages)


def test_instance_digest_in_a_tiny_world():
    digest = InstanceDigest()
    full = {"object": "cache.digest", "instance": "i1", "namespace": "00" * 32, "tokenizer": "t", "block_size": 4,
            "hash_bytes": 2, "generation": 7, "full": True, "blocks": ["0001", "0002"]}
    assert digest.apply(full, polled_at=1.0) == "full" and digest.held == {b"\0\1", b"\0\2"}
    digest.predict([b"\0\3", b"\0\4"], now=2.0)
    assert digest.matched([b"\0\1", b"\0\3", b"\0\4", b"\0\1"]) == 4 and digest.matched([b"\0\x09"]) == 0
    delta = {**full, "full": False, "since": 7, "generation": 9, "added": ["0003"], "removed": ["0001"]}
    del delta["blocks"]
    assert digest.apply(delta, polled_at=3.0) == "delta"  # a poll after the prediction: it is dropped
    assert digest.held == {b"\0\2", b"\0\3"} and digest.generation == 9 and digest.matched([b"\0\3", b"\0\4"]) == 1
    with pytest.raises(StaleDigest):
        digest.apply({**delta, "since": 8, "generation": 10}, polled_at=4.0)
    with pytest.raises(StaleDigest):
        digest.apply({**delta, "instance": "i2", "since": 9, "generation": 10}, polled_at=4.0)
    for bad in ({**full, "blocks": ["zz"]}, {**full, "blocks": ["000102"]}, {**full, "generation": "7"}, [1]):
        with pytest.raises(ValueError):
            digest.apply(bad, polled_at=5.0)
    assert digest.generation == 9  # nothing changed
    digest.clear()
    assert not digest.ready and digest.held == set()


def test_router_config_digest_fields():
    with pytest.raises(ValueError, match="prefix_source='tokens'; expected one of: digest, text"):
        RouterConfig(prefix_source="tokens")
    with pytest.raises(ValueError, match="digest_interval_s"):
        RouterConfig(digest_interval_s=0)
    with pytest.raises(ValueError, match="model_path=''"):
        RouterConfig(model_path="")
    assert RouterConfig().with_env({"UAKV_API_KEY": "k"}).api_key == "k"
    assert RouterConfig(api_key="mine").with_env({"UAKV_API_KEY": "k"}).api_key == "mine"
    assert "mine" not in repr(RouterConfig(api_key="mine"))
