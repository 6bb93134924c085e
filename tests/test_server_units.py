"""The server's small parts in tiny worlds: ServerConfig validation and its options, request parsing into the
engine's request, admission counts with an injected clock, content events built from per-response bytes."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

import pytest

from ultra_adaptive_kv_cache_engine.server.admission import Admission
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.errors import APIError
from ultra_adaptive_kv_cache_engine.server.metrics import ServerMetrics
from ultra_adaptive_kv_cache_engine.server.options import add_server_options, server_config_from_args
from ultra_adaptive_kv_cache_engine.server.protocol import parse_chat, parse_completion
from ultra_adaptive_kv_cache_engine.server.responses import CHAT, COMPLETION, ResponseWriter, sse_event


def test_defaults_listen_on_loopback_only():
    config = ServerConfig()
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 8000, None) and config.is_loopback
    assert not ServerConfig(host="0.0.0.0").is_loopback and ServerConfig(host="::1").is_loopback


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"port": 70000}, "ServerConfig.port=70000; expected an integer from 0 to 65535"),
    ({"port": True}, "ServerConfig.port=True"),
    ({"host": ""}, "ServerConfig.host=''; expected a non-empty host name"),
    ({"api_key": " "}, "ServerConfig.api_key=' '; expected a non-empty string or None"),
    ({"max_queue": 0}, "ServerConfig.max_queue=0; expected a positive integer"),
    ({"max_prompt_tokens": -5}, "ServerConfig.max_prompt_tokens=-5; expected a positive integer or None"),
    ({"max_body_bytes": 1.5}, "ServerConfig.max_body_bytes=1.5"),
    ({"drain_timeout_s": float("inf")}, "ServerConfig.drain_timeout_s=inf; expected a finite number"),
])
def test_bad_config_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        ServerConfig(**kwargs)


def test_api_key_from_the_environment_unless_given():
    assert ServerConfig().with_env({"UAKV_API_KEY": "env-key"}).api_key == "env-key"
    assert ServerConfig(api_key="flag").with_env({"UAKV_API_KEY": "env-key"}).api_key == "flag"
    assert ServerConfig().with_env({"UAKV_API_KEY": ""}).api_key is None
    assert "flag" not in repr(ServerConfig(api_key="flag"))  # a logged config does not leak the key


def test_one_option_per_config_field():
    parser = argparse.ArgumentParser()
    add_server_options(parser)
    options = {a.dest: a.option_strings for a in parser._actions if a.dest.startswith("server_")}
    assert options == {f"server_{f.name}": [f"--{f.name.replace('_', '-')}"] for f in fields(ServerConfig)}
    args = parser.parse_args(["--host", "::1", "--port", "0", "--max-queue", "3", "--drain-timeout-s", "2.5"])
    config = server_config_from_args(args, {"UAKV_API_KEY": "k"})
    assert (config.host, config.port, config.max_queue, config.drain_timeout_s, config.api_key) == (
        "::1", 0, 3, 2.5, "k")
    assert server_config_from_args(parser.parse_args([]), {}) == ServerConfig()
    with pytest.raises(SystemExit):
        parser.parse_args(["--port", "eighty"])


def test_chat_becomes_the_engine_request():
    parsed = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        "max_completion_tokens": 7, "stop": "\n", "seed": 3, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "user": "u1", "frequency_penalty": 0}, max_tokens_limit=16)
    assert (parsed.model, parsed.stream, parsed.include_usage) == ("m", True, True)
    assert parsed.engine_request == {
        "action": "process", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi there"}],
        "max_new_tokens": 7, "stop": ["\n"], "seed": 3, "temperature": 0.0, "top_p": 1.0}


def test_completion_defaults_are_openai_s():
    parsed = parse_completion({"model": "m", "prompt": ["Once"]}, max_tokens_limit=16)
    assert parsed.engine_request == {"action": "process", "text": "Once", "raw": True, "temperature": 1.0,
                                     "top_p": 1.0}
    assert (parsed.stream, parsed.include_usage) == (False, False)


@pytest.mark.parametrize(("body", "message", "param"), [
    ({"model": "m", "prompt": "x", "best_of": 2}, "best_of=2 is not supported by this server; expected 1", "best_of"),
    ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty=0.5 is not supported", "presence_penalty"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream='yes' is invalid; expected true or false", "stream"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens=True is invalid", "max_tokens"),
    ({"model": "m", "prompt": "   "}, "prompt is empty", "prompt"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt=['a', 'b'] is not supported", "prompt"),
    ({"model": "m", "prompt": "x", "stream": True, "stream_options": {"usage": True}}, "stream_options={'usage'",
     "stream_options"),
    ({"model": 5, "prompt": "x"}, "model=5 is invalid", "model"),
])
def test_bad_completion_fields(body, message, param):
    with pytest.raises(APIError) as exc_info:
        parse_completion(body, max_tokens_limit=16)
    assert exc_info.value.status == 400 and message in exc_info.value.message
    assert exc_info.value.param == param


def test_bad_messages_name_the_index():
    with pytest.raises(APIError, match=r"messages\[1\]\.content\[0\]=\{'type': 'image_url'"):
        parse_chat({"model": "m", "messages": [{"role": "user", "content": "a"},
                                               {"role": "user", "content": [{"type": "image_url"}]}]}, 16)
    with pytest.raises(APIError, match="every message is empty"):
        parse_chat({"model": "m", "messages": [{"role": "user", "content": " "}]}, 16)
    with pytest.raises(APIError, match=r"messages\[0\]=\{'role': 'user'\} is invalid"):
        parse_chat({"model": "m", "messages": [{"role": "user"}]}, 16)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_admission_counts_waiting_running_and_times_tokens():
    clock, metrics = Clock(), ServerMetrics()
    admission = Admission(limit=2, retry_after_s=5, metrics=metrics, clock=clock)
    sample = metrics.registry.get_sample_value
    a, b = admission.admit(), admission.admit()
    assert (admission.waiting, admission.running) == (2, 0)
    with pytest.raises(APIError) as exc_info:
        admission.admit()
    assert exc_info.value.status == 429 and exc_info.value.headers == {"Retry-After": "5"}
    clock.now = 0.5
    a.step(1)
    clock.now = 1.5
    a.step(3)  # two tokens in one second
    assert (admission.waiting, admission.running) == (1, 1)
    assert sample("uakv:num_requests_running") == sample("uakv:num_requests_waiting") == 1
    assert sample("uakv:request_time_to_first_token_seconds_sum") == 0.5
    assert sample("uakv:inter_token_latency_seconds_sum") == 0.5
    a.finish("length", prompt_tokens=10, cached_tokens=8, completion_tokens=3)
    b.release()
    b.release()  # idempotent
    assert (admission.waiting, admission.running) == (0, 0)
    assert sample("uakv:e2e_request_latency_seconds_sum") == 1.5
    assert sample("uakv:request_success_total", {"finished_reason": "length"}) == 1
    assert (sample("uakv:prompt_tokens_total"), sample("uakv:prompt_tokens_cached_total"),
            sample("uakv:generation_tokens_total")) == (10, 8, 3)
    assert admission.admit() is not None


def test_a_prompt_limit_needs_the_model_s_tokenizer():
    from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
    from ultra_adaptive_kv_cache_engine.server.app import create_app

    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig())  # no model is loaded: the check comes first
    with pytest.raises(ValueError, match=r"max_prompt_tokens=5 needs the model's tokenizer; pass the LoadedModel"):
        create_app(engine, ServerConfig(max_prompt_tokens=5))
    with pytest.raises(TypeError, match="config must be a ServerConfig, got dict"):
        create_app(engine, {"port": 1})


def test_engine_errors_become_openai_errors():
    from ultra_adaptive_kv_cache_engine.engine.requests import RequestError
    from ultra_adaptive_kv_cache_engine.engine.scheduler import QueueFullError
    from ultra_adaptive_kv_cache_engine.server.generation import engine_error

    full = engine_error(QueueFullError("max_waiting=2 requests already wait"), retry_after_s=4)
    assert (full.status, full.code, full.headers) == (429, "queue_full", {"Retry-After": "4"})
    assert "the engine's queue is full: max_waiting=2 requests already wait" in full.message
    bad = engine_error(RequestError("max_new_tokens=9 is too many"), retry_after_s=4)
    assert (bad.status, bad.message) == (400, "max_tokens=9 is too many")
    crash = engine_error(KeyError("boom"), retry_after_s=4)
    assert (crash.status, crash.type) == (500, "server_error") and "KeyError" in crash.message


@pytest.mark.parametrize("shape", [CHAT, COMPLETION])
@pytest.mark.parametrize("include_usage", [False, True])
def test_content_events_are_the_chunks_json(shape, include_usage):
    writer = ResponseWriter(shape, 'm"odel\\', include_usage=include_usage)
    for text in ("hello", 'quo"te\\back', "line\nbreak\ttab\x01", "ünï 字 🚀", "</script>"):
        event = writer.content_event(text)
        assert event == sse_event(writer.chunk(text))
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert json.loads(event[6:]) == writer.chunk(text)
