"""Quantized pools on CUDA (marked gpu, skipped without it): the paged backend with Triton kernels, staging
entries in the block tables of the decode graphs, quantize on write after each step.

- float32 int8: greedy tokens of requests joining the batch equal those of an unquantized pool; the graphs were
  captured; the pool and the staging blocks balance at idle;
- every format in bfloat16: graph-replayed decode gives exactly the tokens of eager decode, and a repeated
  prompt reuses its sealed prefix;
- the Triton kernels and the reference kernels on the same quantized pool give the same float32 tokens;
- a staging tensor that grows mid-run drops the captured graphs (they hold the old tensor's address): the tokens
  stay those of a run that never grew.
"""

from __future__ import annotations

import functools

import pytest
import torch
from model_fixtures import random_ids

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression.pool_formats import POOL_FORMATS
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.kernels import get_backend, triton_available
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama
from ultra_adaptive_kv_cache_engine.model.tiny import TinyLlamaSpec, build_tiny_llama

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and triton"),
]
BS = 16
SPEC = TinyLlamaSpec(num_layers=2, hidden_size=128, num_heads=8, num_kv_heads=2)
PROMPTS = [random_ids(n, seed=n) for n in (7, 33, 18, 50, 3)]


@functools.cache
def cuda_lm() -> LoadedModel:
    return build_tiny_llama(SPEC, "cuda")


@functools.cache
def bf16_model() -> PagedLlama:
    lm = cuda_lm()
    return PagedLlama.from_state_dict({k: v.to(torch.bfloat16) for k, v in lm.model.state_dict().items()},
                                      lm.model.config, max_positions=256)


class World:
    def __init__(self, model: PagedLlama, fmt: str | None, cuda_graphs: bool = True, num_blocks: int = 128) -> None:
        s = model.shape
        config = KVCacheConfig(block_size=BS, device="cuda", kv_dtype=fmt, cpu_tier_bytes=0,
                               kv_residual_tokens=0)  # every full block read sealed: the kernels under test
        spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, model.device, pool_format=fmt)
        self.cache = KVCacheManager(config, spec, num_blocks=num_blocks)
        sched = SchedulerConfig(cuda_graphs=cuda_graphs, admission_headroom=0.0)
        self.backend = PagedLlamaBackend(model, self.cache, sched)
        self.loop = StepLoop(Scheduler(self.backend, sched), threaded=False)

    def submit(self, prompt: list[int], new: int = 12) -> SequenceState:
        state = SequenceState(prompt=prompt, params=SamplingParams(max_new_tokens=new),
                              text=IncrementalText(lambda ids: ""), eos_token_id=None)
        self.loop.submit(state, lambda item: True)
        return state

    def run_joining(self, new_late: int = 20, grow_after: int | None = None) -> list[list[int]]:
        states = [self.submit(p) for p in PROMPTS[:3]]
        for i in range(4):
            self.loop.step()
            if grow_after == i:
                self.backend.staging._grow()
        states += [self.submit(p, new=new_late) for p in PROMPTS[3:]]  # a batch of 5, padded to 8
        self.loop.run_until_idle()
        return [s.generated for s in states]

    def balanced(self) -> bool:
        staging = self.backend.staging
        return (self.cache.num_free_blocks == self.cache.num_blocks and self.cache.stats()["sequences"] == 0
                and (staging is None or staging.num_free == staging.capacity))

    def captured(self) -> bool:
        return any(step.captured for step in self.backend._steps.values())


def test_float32_int8_tokens_equal_the_unquantized_pool_and_graphs_are_captured():
    model = PagedLlama.from_hf(cuda_lm().model, max_positions=256)
    plain = World(model, None).run_joining()
    world = World(model, "int8")
    assert world.run_joining() == plain
    assert world.captured(), [s.capture_error for s in world.backend._steps.values()]
    assert 8 in world.backend._steps and world.balanced()


@pytest.mark.parametrize("fmt", list(POOL_FORMATS))
def test_bfloat16_graph_decode_equals_eager_and_reuses_sealed_prefixes(fmt):
    outputs = []
    for graphs in (True, False):
        world = World(bf16_model(), fmt, cuda_graphs=graphs)
        outputs.append(world.run_joining())
        assert world.balanced()
    assert outputs[0] == outputs[1]
    again = world.submit(PROMPTS[3], new=4)
    world.loop.run_until_idle()
    assert again.cached_tokens == 48 and world.balanced()  # 3 sealed blocks of the 50-token prompt


def test_triton_and_reference_kernels_agree_on_a_quantized_pool():
    lm = cuda_lm()
    triton_model = PagedLlama.from_hf(lm.model, max_positions=256)
    reference_model = PagedLlama.from_hf(lm.model, max_positions=256, backend=get_backend("reference"))
    for fmt in ("fp8", "int4"):
        triton = World(triton_model, fmt, cuda_graphs=False).run_joining()
        reference = World(reference_model, fmt, cuda_graphs=False).run_joining()
        assert triton == reference, fmt


def test_a_staging_tensor_growing_mid_run_drops_the_graphs_and_stays_exact():
    model = bf16_model()
    expected = World(model, "int4").run_joining()
    world = World(model, "int4")
    assert world.run_joining(grow_after=2) == expected
    assert world.backend.staging.generation == 1 and world.captured() and world.balanced()
