"""`uakv serve` with `--kv-press` (the app over an engine with `kv_press`, a real uvicorn server on a loopback
port, the official `openai` client): the repeated prompt reuses the pressed chain and says so in
usage.prompt_tokens_details.cached_tokens; the answer is the same."""

from __future__ import annotations

import openai
from model_fixtures import tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.cli import build_parser, config_from_args
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

BLOCK = 4
QUESTION = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a cache?"}]


def test_serve_takes_kv_press():
    args = build_parser().parse_args(["serve", "--kv-press", "snapkv:0.5,window=8", "--block-size", "4"])
    assert config_from_args(args).kv_press == "snapkv:0.5,window=8"


def test_a_repeated_prompt_reports_the_pressed_tokens_it_reused():
    config = KVCacheConfig(block_size=BLOCK, max_new_tokens=8, max_memory=2 * 1024**2, cpu_tier_bytes=0,
                           kv_press="sinks_window:tokens=8")
    engine = UltraAdaptiveKVCacheEngine(config, model=tiny_model())
    try:
        with BackgroundServer(create_app(engine, ServerConfig(), tiny_model())) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            model = tiny_model().model_id
            first = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=6)
            second = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=6)
            client.close()
        prompt = first.usage.prompt_tokens
        assert prompt > 9  # the press keeps 8 of the prompt's first prompt - 1 tokens
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        assert second.usage.prompt_tokens_details.cached_tokens == prompt - 1
        assert second.choices[0].message.content == first.choices[0].message.content
        stats = engine.cache_manager().counters.snapshot()
        assert (stats["named_committed_blocks"], stats["named_hit_tokens"]) == (2, prompt - 1)
    finally:
        engine.close()
