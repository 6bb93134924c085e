"""Continuous batching on the real embedded SmolLM2-135M-Instruct (slow): concurrent chat requests through the
scheduler and the paged Llama forward (CPU, reference kernels) give transformers' greedy tokens of each alone,
and a second turn reuses the first one's KV."""

from __future__ import annotations

import asyncio

import pytest
import torch
from model_fixtures import baseline_generate, smollm_model

from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.session import ModelSession

pytestmark = pytest.mark.slow
NEW = 8
QUESTIONS = ["What is the capital of France?", "Name a primary color.", "Count to three.", "Say hi."]


@pytest.fixture(scope="module")
def smollm():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one OpenMP thread
    yield smollm_model()
    torch.set_num_threads(threads)


def expected(lm, ids: list[int]) -> list[int]:
    out = baseline_generate(lm, ids, NEW)[0, len(ids) :].tolist()
    eos = lm.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out


async def completion(session: ModelSession, request: dict) -> tuple[list[int], int]:
    chunks = [c async for c in session.stream(request)]
    return [t for c in chunks for t in c.token_ids], chunks[-1].cached_tokens


@pytest.mark.asyncio
async def test_concurrent_chats_equal_generate_alone_and_turn_two_reuses_turn_one(smollm):
    config = KVCacheConfig(device="cpu", block_size=16, max_new_tokens=NEW, max_memory=64 * 1024**2)
    session = ModelSession(config, loaded=smollm, scheduler_config=SchedulerConfig(max_step_tokens=64))
    assert session.backend.name == "paged_llama"
    requests = [{"messages": [{"role": "user", "content": q}]} for q in QUESTIONS]
    got = await asyncio.gather(*(completion(session, r) for r in requests))
    codec = smollm.tokenizer
    assert [g[0] for g in got] == [expected(smollm, codec.chat(r["messages"])) for r in requests]
    messages = [*requests[0]["messages"], {"role": "assistant", "content": codec.decode(got[0][0])},
                {"role": "user", "content": "And of Spain?"}]
    tokens, cached = await completion(session, {"messages": messages})
    assert tokens == expected(smollm, codec.chat(messages)) and cached >= len(codec.chat(requests[0]["messages"])) // 16 * 16
    assert session.cache.num_free_blocks == session.cache.num_blocks
