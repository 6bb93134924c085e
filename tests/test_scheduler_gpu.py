"""The scheduler's paged backend on CUDA (marked gpu, skipped without it): Triton kernels, packed prefill,
decode replayed from CUDA graphs per padded batch size.

- float32: greedy tokens of requests joining and leaving the batch equal transformers' generate on the GPU;
  the graphs were captured, and the pad blocks went back to the pool at idle (exact accounting);
- bfloat16: the graph-replayed decode gives exactly the tokens of eager decode (same kernels).
"""

from __future__ import annotations

import functools

import pytest
import torch
from model_fixtures import random_ids

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.kernels import triton_available
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton"),
]
NEW = 12
BS = 16
SPEC = TinyLlamaSpec(num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=2)


@functools.cache
def cuda_lm() -> LoadedModel:
    return build_tiny_llama(SPEC, "cuda")


def world(model: PagedLlama, cuda_graphs: bool = True, num_blocks: int = 128) -> tuple[KVCacheManager, StepLoop]:
    s = model.shape
    config = KVCacheConfig(block_size=BS, max_tokens=BS * num_blocks, device="cuda")
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, model.device)
    cache = KVCacheManager(config, spec, num_blocks=num_blocks)
    sched_config = SchedulerConfig(cuda_graphs=cuda_graphs, admission_headroom=0.0)
    loop = StepLoop(Scheduler(PagedLlamaBackend(model, cache, sched_config), sched_config), threaded=False)
    return cache, loop


def submit(loop: StepLoop, prompt: list[int], new: int = NEW) -> SequenceState:
    state = SequenceState(prompt=prompt, params=SamplingParams(max_new_tokens=new),
                          text=IncrementalText(lambda ids: ""), eos_token_id=None)
    loop.submit(state, lambda item: True)
    return state


def hf_new_tokens(lm: LoadedModel, prompt: list[int], new: int = NEW) -> list[int]:
    with torch.no_grad():
        out = lm.model.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=new, do_sample=False,
                                eos_token_id=None)
    return out[0, len(prompt) :].tolist()


def test_float32_requests_joining_the_batch_equal_generate():
    lm = cuda_lm()
    model = PagedLlama.from_hf(lm.model, max_positions=256)
    cache, loop = world(model)
    prompts = [random_ids(n, seed=n) for n in (7, 33, 18, 50, 3)]
    states = [submit(loop, p) for p in prompts[:3]]
    for _ in range(4):
        loop.step()
    states += [submit(loop, p, new=20) for p in prompts[3:]]  # join mid-decode: a batch of 5, padded to 8
    loop.run_until_idle()
    assert [s.generated for s in states] == [hf_new_tokens(lm, p, len(s.generated)) for p, s in zip(prompts, states, strict=True)]
    backend = loop.scheduler.backend
    assert any(step.captured for step in backend._steps.values()), [s.capture_error for s in backend._steps.values()]
    assert 8 in backend._steps and cache.num_free_blocks == cache.num_blocks and cache.stats()["sequences"] == 0


def test_bfloat16_graph_decode_equals_eager_decode():
    lm = cuda_lm()
    model = PagedLlama.from_state_dict({k: v.to(torch.bfloat16) for k, v in lm.model.state_dict().items()},
                                       lm.model.config, max_positions=256)
    prompts = [random_ids(n, seed=100 + n) for n in (9, 40, 21)]
    outputs = []
    for graphs in (True, False):
        _, loop = world(model, cuda_graphs=graphs)
        states = [submit(loop, p, new=24) for p in prompts]
        loop.run_until_idle()
        outputs.append([s.generated for s in states])
    assert outputs[0] == outputs[1]
