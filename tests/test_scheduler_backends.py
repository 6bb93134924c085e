"""Model backends behind one interface: the registry's choice, and the transformers-generate fallback driven
step by step by the scheduler (tiny random Llama and a tiny random Qwen2, CPU, float32): greedy tokens of
concurrent requests equal each request alone through transformers' generate; the pool ends balanced."""

from __future__ import annotations

import asyncio

import pytest
import torch
from model_fixtures import baseline_generate, random_ids, tiny_model

from ultra_adaptive_kv_cache_engine import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.backend_registry import BACKENDS, make_backend, register_backend
from ultra_adaptive_kv_cache_engine.engine.hf_backend import HFGenerateBackend
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.session import ModelSession
from ultra_adaptive_kv_cache_engine.model.fingerprint import state_dict_fingerprint
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.text import ByteTextCodec

CONFIG = KVCacheConfig(max_tokens=4096, block_size=4, max_new_tokens=8, max_memory=2 * 1024**2)
NEW = 8


@pytest.fixture(scope="module")
def lm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tiny_model()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def qwen() -> LoadedModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    return LoadedModel(model=model, tokenizer=ByteTextCodec(), model_id="tiny-qwen2",
                       weights_fingerprint=state_dict_fingerprint(model), dtype=torch.float32,
                       device=torch.device("cpu"), max_context=512)


def expected(model: LoadedModel, prompt: list[int], new: int = NEW) -> list[int]:
    out = baseline_generate(model, prompt, new)[0, len(prompt) :].tolist()
    return out[: out.index(2)] if 2 in out else out  # eos (2) ends the completion, uncounted


async def completions(session: ModelSession, prompts: list[list[int]], new: int = NEW) -> list[list[int]]:
    async def one(prompt: list[int]) -> list[int]:
        stream = session.stream({"text": "".join(chr(t - 3) for t in prompt), "raw": True, "max_new_tokens": new})
        return [t for chunk in [c async for c in stream] for t in chunk.token_ids]

    return list(await asyncio.gather(*(one(p) for p in prompts)))


def ascii_prompt(n: int, seed: int) -> list[int]:
    return random_ids(n, seed=seed, low=3 + 32, high=3 + 127)  # printable ASCII through the byte codec


def balanced(session: ModelSession) -> bool:
    return session.cache.stats()["sequences"] == 0 and session.cache.num_free_blocks == session.cache.num_blocks


def test_registry_picks_the_paged_forward_for_llama_and_generate_otherwise(lm, qwen):
    assert list(BACKENDS) == ["paged_llama", "hf_generate"]
    assert ModelSession(CONFIG, loaded=lm).backend.name == "paged_llama"
    assert ModelSession(CONFIG, loaded=qwen).backend.name == "hf_generate"
    session = ModelSession(CONFIG, loaded=lm)
    with pytest.raises(ValueError, match="unknown model backend 'vllm'; expected one of: paged_llama, hf_generate"):
        make_backend("vllm", lm, session.cache, SchedulerConfig())
    with pytest.raises(ValueError, match="'paged_llama' cannot serve 'tiny-qwen2': model_type='qwen2'"):
        ModelSession(CONFIG, loaded=qwen, scheduler_config=SchedulerConfig(backend="paged_llama"))
    with pytest.raises(ValueError, match="already registered"):
        register_backend(HFGenerateBackend)


@pytest.mark.asyncio
@pytest.mark.parametrize("which", ["llama", "qwen2"])
async def test_generate_backend_serves_concurrent_requests_exactly(lm, qwen, which):
    model = lm if which == "llama" else qwen
    session = ModelSession(CONFIG, loaded=model, scheduler_config=SchedulerConfig(backend="hf_generate"))
    prompts = [ascii_prompt(n, seed=n) for n in (6, 15, 9)]
    got = await completions(session, prompts)
    assert got == [expected(model, p) for p in prompts]
    again = await completions(session, prompts[:1])  # its prefix is cached now
    assert again == got[:1] and session.stats()["cached_tokens"] > 0
    assert balanced(session)


@pytest.mark.asyncio
async def test_generate_backend_cancellation_ends_generate_and_frees(qwen):
    session = ModelSession(CONFIG, loaded=qwen)
    stream = session.stream({"text": "go on and on", "raw": True, "max_new_tokens": 100})
    await stream.__anext__()
    await stream.aclose()
    assert stream.state.finish_reason == "cancelled" and stream.state.kv is None
    assert balanced(session)


@pytest.mark.asyncio
async def test_paged_and_generate_backends_agree_on_sampled_tokens_too(lm):
    request = {"text": "sample me", "raw": True, "max_new_tokens": 10, "temperature": 0.8, "top_p": 0.9, "seed": 7}
    texts = []
    for name in ("paged_llama", "hf_generate"):
        session = ModelSession(CONFIG, loaded=lm, scheduler_config=SchedulerConfig(backend=name))
        texts.append((await session.process(request))["text"])
    assert texts[0] == texts[1]
