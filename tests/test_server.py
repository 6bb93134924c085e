"""`uakv serve`'s app through the official `openai` client: a real uvicorn server on a loopback port in a
background thread, over an engine on the tiny random Llama."""

from __future__ import annotations

import asyncio

import openai
import pytest
from model_fixtures import tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig, UltraAdaptiveKVCacheEngine
from ultra_adaptive_kv_cache_engine.server.app import create_app
from ultra_adaptive_kv_cache_engine.server.config import ServerConfig
from ultra_adaptive_kv_cache_engine.server.run import BackgroundServer

BLOCK = 4
QUESTION = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is a cache?"}]


def make_engine() -> UltraAdaptiveKVCacheEngine:
    config = KVCacheConfig(max_tokens=4096, block_size=BLOCK, max_new_tokens=8, max_memory=2 * 1024**2)
    return UltraAdaptiveKVCacheEngine(config, model=tiny_model())


@pytest.fixture
def served(request):
    """(engine, server, client); parametrize it indirectly with a dict of ServerConfig fields."""
    config = ServerConfig(**getattr(request, "param", {}))
    engine = make_engine()
    with BackgroundServer(create_app(engine, config, tiny_model())) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=config.api_key or "unused", max_retries=0)
        yield engine, server, client
        client.close()
    engine.close()


MODEL = tiny_model().model_id


def engine_answer(engine, request) -> dict:
    return asyncio.run(engine.process_request({"action": "process", "temperature": 0.0, **request}))


def test_models_lists_the_served_model(served):
    _, _, client = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).owned_by == "uakv"


def test_chat_completion_is_the_engine_answer_with_usage(served):
    engine, _, client = served
    expected = engine_answer(make_engine(), {"messages": QUESTION, "max_new_tokens": 8})
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert (choice.index, choice.message.role, choice.message.content) == (0, "assistant", expected["text"])
    assert choice.finish_reason == expected["finish_reason"]
    usage = reply.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected["prompt_tokens"], expected["completion_tokens"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_text_completion_sends_the_prompt_as_is(served):
    _, _, client = served
    expected = engine_answer(make_engine(), {"text": "Once upon a time", "raw": True, "max_new_tokens": 5})
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=5)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.choices[0].text == expected["text"]
    assert reply.usage.prompt_tokens == len(b"Once upon a time")  # the tiny tokenizer is bytes, no template
    assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"


def test_repeated_prefix_reports_cached_tokens(served):
    _, _, client = served
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=4)
    prompt = first.usage.prompt_tokens
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == min(prompt - 1, prompt // BLOCK * BLOCK)
    assert second.choices[0].message.content == first.choices[0].message.content
    longer = QUESTION + [{"role": "assistant", "content": "A store."}, {"role": "user", "content": "Why?"}]
    third = client.chat.completions.create(model=MODEL, messages=longer, temperature=0, max_tokens=4)
    assert third.usage.prompt_tokens_details.cached_tokens >= prompt // BLOCK * BLOCK - BLOCK


def test_streamed_chat_equals_the_whole_answer_and_ends_with_usage(served):
    _, _, client = served
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and set(reasons[:-1]) == {None}
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    assert usage.prompt_tokens_details.cached_tokens > 0  # the whole answer cached the prompt's blocks


def test_streamed_completion_without_usage(served):
    _, _, client = served
    whole = client.completions.create(model=MODEL, prompt="abc", temperature=0, max_tokens=6)
    chunks = list(client.completions.create(model=MODEL, prompt="abc", temperature=0, max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)


def test_stop_seed_and_sampling_parameters_reach_the_engine(served):
    engine, _, client = served
    full = client.completions.create(model=MODEL, prompt="Tell me", temperature=0, max_tokens=8).choices[0].text
    stop = next((ch for ch in full[1:] if ch != "\ufffd"), None)
    if stop is not None:
        cut = client.completions.create(model=MODEL, prompt="Tell me", temperature=0, max_tokens=8, stop=[stop])
        assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model=MODEL, prompt="Tell me", temperature=1.5, top_p=0.9, seed=7,
                                         max_tokens=8).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]  # the same seed, the same sample


def assert_api_error(exc_info, status: int, *fragments: str, param: str | None = None, code: str | None = None):
    error = exc_info.value
    assert error.status_code == status
    body = error.body
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    if param is not None:
        assert body["param"] == param
    if code is not None:
        assert body["code"] == code


def test_unknown_model_is_404_model_not_found(served):
    _, _, client = served
    with pytest.raises(openai.NotFoundError) as exc_info:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert_api_error(exc_info, 404, "'gpt-4o' does not exist", MODEL, param="model", code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


@pytest.mark.parametrize(("fields", "fragments", "param"), [
    ({"n": 2}, ("n=2 is not supported", "n=1"), "n"),
    ({"max_tokens": 5000}, ("max_tokens=5000 is invalid", "from 1 to 4096"), "max_tokens"),
    ({"max_tokens": 0}, ("max_tokens=0 is invalid",), "max_tokens"),
    ({"max_completion_tokens": 4, "max_tokens": 4}, ("not both",), "max_completion_tokens"),
    ({"temperature": "hot"}, ("temperature='hot' is invalid", "a number from 0 to 2"), "temperature"),
    ({"temperature": 3}, ("temperature=3 is invalid",), "temperature"),
    ({"top_p": 0}, ("top_p=0 is invalid",), "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, ("stop=", "1 to 4 non-empty strings"), "stop"),
    ({"seed": -1}, ("seed=-1 is invalid",), "seed"),
    ({"logprobs": True}, ("logprobs=True is not supported",), "logprobs"),
    ({"stream_options": {"include_usage": True}}, ("only allowed when stream is true",), "stream_options"),
    ({"messages": [{"role": "tool", "content": "x"}]}, ("messages[0].role='tool' is not supported",),
     "messages[0].role"),
    ({"messages": []}, ("messages=[] is invalid",), "messages"),
])
def test_bad_chat_fields_are_400_naming_the_field(served, fields, fragments, param):
    _, _, client = served
    request = {"model": MODEL, "messages": QUESTION, **fields}
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.chat.completions.create(**request)
    assert_api_error(exc_info, 400, *fragments, param=param)


def test_unknown_fields_and_token_prompts_are_refused(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.completions.create(model=MODEL, prompt="hi", extra_body={"max_token": 3})
    assert_api_error(exc_info, 400, "unrecognized request argument(s) ['max_token']", param="max_token")
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.completions.create(model=MODEL, prompt=[1, 2, 3])
    assert_api_error(exc_info, 400, "prompt=[1, 2, 3] is not supported", param="prompt")


def test_prompt_over_the_model_context_is_400(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.completions.create(model=MODEL, prompt="x" * 600, max_tokens=4)
    assert_api_error(exc_info, 400, "prompt of 600 tokens + max_tokens=4 exceeds the model's context of 512")


@pytest.mark.parametrize("served", [dict(max_prompt_tokens=20, max_tokens_limit=16)], indirect=True)
def test_server_limits_on_prompt_and_max_tokens(served):
    _, _, client = served
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.completions.create(model=MODEL, prompt="x" * 21, max_tokens=4)
    assert_api_error(exc_info, 400, "the prompt is 21 tokens; this server accepts at most 20", param="prompt",
                     code="context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as exc_info:
        client.completions.create(model=MODEL, prompt="x" * 20, max_tokens=17)
    assert_api_error(exc_info, 400, "max_tokens=17 is invalid; expected an integer from 1 to 16")
    assert client.completions.create(model=MODEL, prompt="x" * 20, max_tokens=16).usage.prompt_tokens == 20


@pytest.mark.parametrize("served", [dict(max_queue=2, retry_after_s=3)], indirect=True)
def test_full_queue_is_429_with_retry_after_then_serves_again(served):
    _, server, client = served
    admission = server.server.config.app.state.admission
    held = [admission.admit(), admission.admit()]  # two requests in flight: the limit
    with pytest.raises(openai.RateLimitError) as exc_info:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
    assert_api_error(exc_info, 429, "2 requests in flight, its limit is 2", code="queue_full")
    assert exc_info.value.response.headers["retry-after"] == "3"
    for ticket in held:
        ticket.release()
    assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("served", [dict(api_key="sekrit")], indirect=True)
def test_api_key_is_required_when_set(served):
    _, server, client = served
    assert client.models.list().data[0].id == MODEL
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="guess", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc_info:
        wrong.chat.completions.create(model=MODEL, messages=QUESTION)
    assert_api_error(exc_info, 401, "incorrect API key", code="invalid_api_key")
    wrong.close()


def test_the_server_keeps_serving_after_every_error(served):
    engine, _, client = served
    failures = [
        lambda: client.chat.completions.create(model="other", messages=QUESTION),
        lambda: client.chat.completions.create(model=MODEL, messages=QUESTION, n=3),
        lambda: client.completions.create(model=MODEL, prompt="", max_tokens=2),
        lambda: client.completions.create(model=MODEL, prompt="y" * 700),
    ]
    for fail in failures:
        with pytest.raises(openai.APIStatusError):
            fail()
    reply = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3
    stats = engine.get_stats()["model"]
    assert stats["free_blocks"] == stats["num_blocks"]
