"""The world of bench_end_to_end_gpu.py: a random-weight Llama (Llama-3-8B shape, or a tiny one for --quick)
built on the device, its `PagedLlama`, and the paged caches and runners the timed parts share.

Invariants: weights are seeded (`--seed`, `--init-std`); the TTFT cache has a CPU tier below it (`PromotionTiers`,
pinned on CUDA) that times every promotion's load; every kernel is compiled by `build_world` before any timing.
Import it after the script's `stub_missing_modules()` (the package imports the Redis client and xxhash).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from model_runner import ModelRunner, RunnerConfig

from ultra_adaptive_kv_cache_engine.cache.lower_tiers import LowerTiers
from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager, default_namespace
from ultra_adaptive_kv_cache_engine.compression import make_codec
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.gathered_prefill import PrefillPath
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama
from ultra_adaptive_kv_cache_engine.tiers import CPUTier, TieredStore, records_to_host
from ultra_adaptive_kv_cache_engine.tiers.block_io import LoadResult

NAME = "end_to_end_gpu"
LLAMA3_8B = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8,
             "intermediate_size": 14336, "vocab_size": 128256}
TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 128, "vocab_size": 320}


def log(msg: str) -> None:
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class LoadTimer:
    """The time of one load: CUDA events around the copies on the device (the host does not wait for them, so the
    prefill is launched while they run, as in serving), or host time on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if device.type == "cuda" else None
        self.start = time.perf_counter()
        if self.events is not None:
            self.events[0].record()
        self.host_s = 0.0

    def stop(self) -> LoadTimer:
        self.host_s = time.perf_counter() - self.start
        if self.events is not None:
            self.events[1].record()
        return self

    @property
    def seconds(self) -> float:
        """The load's own time (waits for its copies on CUDA: read it after the TTFT is taken)."""
        if self.events is None:
            return self.host_s
        self.events[1].synchronize()
        return self.events[0].elapsed_time(self.events[1]) / 1e3


class PromotionTiers(LowerTiers):
    """The cache's lower tiers, timing each promotion's load (`LoadTimer`: nothing is synchronised, so the load
    overlaps the prefill's launch as in serving). `staged` swaps in the former load (every record decoded into
    one fresh pinned host buffer, one host-to-device copy, one index_copy_) as a reference."""

    staged = False
    loads: list[tuple[LoadTimer, LoadResult]]

    def load(self, pool_kv: torch.Tensor, block_ids: Sequence[int], records: Sequence[Any]) -> LoadResult:  # type: ignore[override]
        timer = LoadTimer(pool_kv.device)
        if self.staged:
            host = records_to_host(records, tuple(pool_kv.shape[1:]), pool_kv.dtype, pin_memory=pool_kv.is_cuda)
            index = torch.tensor([int(b) for b in block_ids], dtype=torch.long).to(pool_kv.device, non_blocking=True)
            pool_kv.index_copy_(0, index, host.to(pool_kv.device, non_blocking=True))
            result = LoadResult(decoded=len(records))
        else:
            result = super().load(pool_kv, block_ids, records)
        self.loads.append((timer.stop(), result))
        return result


@dataclass
class World:
    hf: Any
    model: PagedLlama
    ttft_cache: KVCacheManager
    tiers: PromotionTiers
    ttft_runner: ModelRunner
    kernel_runner: ModelRunner  # the same cache, prefills over a cached prefix forced onto the paged kernel
    decode_cache: KVCacheManager
    runner: ModelRunner
    eager_runner: ModelRunner
    device: torch.device
    gen: torch.Generator
    last_prompt: list[int] = field(default_factory=list)  # the uncached prompt that (b) and (c) reuse

    def prompt(self, n: int) -> list[int]:
        return torch.randint(3, self.model.shape.vocab_size, (n,), generator=self.gen).tolist()


def build_hf(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Any:
    """A LlamaForCausalLM built directly on the device in its dtype, then re-initialised in place (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**(TINY if args.quick else LLAMA3_8B), max_position_embeddings=args.prompt_tokens + 256,
                         rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, args.init_std, generator=gen)
            else:
                param.fill_(1.0)  # RMSNorm weights
    return model.eval()


def make_cache(
    model: PagedLlama, block_size: int, tokens: int, tier_tokens: int = 0
) -> tuple[KVCacheManager, PromotionTiers | None]:
    """A pool of `tokens` tokens on the model's device; with `tier_tokens`, a CPU tier of that many below it
    (pinned on CUDA)."""
    s = model.shape
    blocks = math.ceil(tokens / block_size)
    # The runner's own kernels write the KV; the finite check on its placeholder appends would sync the device.
    config = KVCacheConfig(block_size=block_size, device=model.device.type,
                           reject_non_finite=False)
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, block_size, model.dtype, model.device)
    namespace = default_namespace(config, spec)
    tiers = None
    if tier_tokens:
        capacity = int(math.ceil(tier_tokens / block_size) * (spec.bytes_per_block + 4096))
        tier = CPUTier(namespace.digest, capacity_bytes=capacity, pin_memory=model.device.type == "cuda")
        tiers = PromotionTiers(TieredStore([tier]), make_codec("identity"))
        tiers.loads = []
    return KVCacheManager(config, spec, num_blocks=blocks, namespace=namespace, lower=tiers), tiers


def build_world(args: argparse.Namespace) -> World:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hf = build_hf(args, device, dtype)
    model = PagedLlama.from_hf(hf)
    bs, p = args.block_size, args.prompt_tokens
    ttft_cache, tiers = make_cache(model, bs, 3 * p + 8 * bs, tier_tokens=2 * p + 8 * bs)
    assert tiers is not None
    ttft_runner = ModelRunner(model, ttft_cache, RunnerConfig(max_context=p + 2 * bs, cuda_graphs=False))
    kernel_runner = ModelRunner(model, ttft_cache, RunnerConfig(max_context=p + 2 * bs, cuda_graphs=False,
                                                                prefill_path=PrefillPath.KERNEL))
    per_row = args.decode_prompt + args.new_tokens + bs
    decode_cache, _ = make_cache(model, bs, 2 * max(args.batches) * per_row)
    runner = ModelRunner(model, decode_cache, RunnerConfig(max_context=per_row))
    eager = ModelRunner(model, decode_cache, RunnerConfig(max_context=per_row, cuda_graphs=False))
    world = World(hf, model, ttft_cache, tiers, ttft_runner, kernel_runner, decode_cache, runner, eager, device,
                  torch.Generator().manual_seed(args.seed))
    warm = world.prompt(min(p, 4 * bs))
    for _ in range(2):  # compiles every kernel outside the timings: SDPA prefill, then paged prefill, decode
        ttft_runner.generate([warm], 2)
    tiers.flush()
    return world
