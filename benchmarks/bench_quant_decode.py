"""Decode on the live path with a quantized pool: the scheduler and the paged backend, bf16 pool vs kv_dtype.

Question: on the path a user takes (`Scheduler` -> `PagedLlamaBackend` -> `KVCacheManager`, CUDA graphs, Triton
kernels), how much faster is one decode step of `--batch` sequences over `--context`-token contexts when the
pool is quantized (fp8, int8, int4, int2) instead of bf16, and what share of the decode time does quantize on
write (`StagingBlocks.seal`: full staging blocks sealed at the end of a step) take?

Model: a Llama-3-8B-shaped model with random bf16 weights (`--layers` of them, 32 by default). Each sequence's
prompt prefix is cached before the timed part: its full blocks are filled with random KV (a quantized pool:
random bf16 sealed through the backend's `seal_blocks`, as the live path seals) and committed, so admission
reuses them and prefills only the last partial block. Then every arm runs the same `--steps` decode steps of
the whole batch; a step's time is the wall time of `StepLoop.step` (it reads the sampled ids back, so the
device work is done). Sealing is timed inside the same steps (a device sync before and after each seal, which
adds a little to the quantized arms). Arms run one after the other in one process, bf16 first (the baseline);
each reports the median step, tokens/s and the ratio to the unquantized arm (kv_dtype "none": the model's
bf16).

--quick: a tiny Llama on the CPU (reference kernels, float32), batch 4, context 64; writes under
$UAKV_RESULTS_DIR (benchmarks/results/quick via `make bench`). A full run writes quant_decode.json where
UAKV_RESULTS_DIR points (the H200 results live in benchmarks/results/h200/).
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from typing import Any

import torch
from bench_common import emit

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState
from ultra_adaptive_kv_cache_engine.engine.step_loop import StepLoop
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

NAME = "quant_decode"
BS = 16
LLAMA3_8B = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "vocab_size": 128256}
TINY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128,
        "vocab_size": 320}
GOALS = {"fp8": 1.6, "int4": 2.5}  # decode attention speed-ups asked of the kernels (the step also reads weights)


def log(msg: str) -> None:
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> PagedLlama:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = TINY if args.quick else LLAMA3_8B
    config = LlamaConfig(**shape, num_hidden_layers=args.layers, max_position_embeddings=args.context + args.steps + 64,
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
            param.normal_(0.0, 0.02, generator=gen) if param.dim() >= 2 else param.fill_(1.0)
    return PagedLlama.from_hf(model.eval(), max_positions=args.context + args.steps + 64)


def fill_prefix(cache: KVCacheManager, backend: PagedLlamaBackend, prompt: list[int], gen: torch.Generator) -> None:
    """Commits the full blocks of all but the prompt's last token with random KV (sealed for a quantized pool)."""
    spec, full = cache.spec, (len(prompt) - 1) // BS * BS
    seq = cache.new_sequence(prompt[:full])
    cache.append(seq, prompt[:full], None, None)
    table = torch.tensor(cache.block_table(seq), dtype=torch.int64, device=spec.device)
    for chunk in table.split(256):
        kv = torch.randn((len(chunk), *spec.staging_block_shape), generator=gen, device=spec.device).to(spec.dtype)
        if spec.pool_format is None:
            cache.kv[chunk] = kv
        else:
            ids = torch.arange(len(chunk), device=spec.device)
            backend.model.backend.seal_blocks(kv, ids, cache.kv, chunk, spec.quant_format)
    cache.commit(seq)
    cache.free(seq)


def run_arm(model: PagedLlama, args: argparse.Namespace, fmt: str | None, prompts: list[list[int]]) -> dict[str, Any]:
    s, device = model.shape, model.device
    blocks = args.batch * math.ceil((args.context + args.steps + BS) / BS) + 64
    config = KVCacheConfig(block_size=BS, device=device.type, kv_dtype=fmt, cpu_tier_bytes=0, reject_non_finite=False)
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, device, pool_format=fmt)
    cache = KVCacheManager(config, spec, num_blocks=blocks)
    sched = SchedulerConfig(max_running=args.batch, max_step_tokens=max(512, args.batch), admission_headroom=0.0)
    backend = PagedLlamaBackend(model, cache, sched)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    for prompt in prompts:
        fill_prefix(cache, backend, prompt, gen)
    seals: list[float] = []
    if backend.staging is not None:
        seal = backend.staging.seal

        def timed_seal(done: Any) -> int:
            sync()
            start = time.perf_counter()
            count = seal(done)
            sync()
            if count:  # a step that filled no block calls it too, for nothing
                seals.append(time.perf_counter() - start)
            return count

        backend.staging.seal = timed_seal  # type: ignore[method-assign]
    loop = StepLoop(Scheduler(backend, sched), threaded=False)
    states = [SequenceState(prompt=p, params=SamplingParams(max_new_tokens=args.steps + args.warmup + 4),
                            text=IncrementalText(lambda ids: ""), eos_token_id=None) for p in prompts]
    for state in states:
        loop.submit(state, lambda item: True)
    while any(len(st.generated) == 0 for st in states):  # admission and the prefill of the last blocks
        loop.step()
    for _ in range(args.warmup):  # graph capture
        loop.step()
    seals.clear()
    sync()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        loop.step()
        times.append(time.perf_counter() - start)
    hit = sum(st.cached_tokens or 0 for st in states) / len(states)
    for state in states:
        loop.cancel(state)
    loop.run_until_idle()
    step = statistics.median(times)
    result = {"kv_dtype": fmt or "none", "step_ms": round(step * 1e3, 3), "tokens_per_s": round(args.batch / step, 1),
              "mean_step_ms": round(statistics.fmean(times) * 1e3, 3), "cached_tokens_per_seq": hit,
              "pool_bytes_per_block": spec.bytes_per_block, "seal_calls": len(seals),
              "seal_ms_per_call": round(statistics.fmean(seals) * 1e3, 3) if seals else 0.0,
              "seal_share_of_decode": round(sum(seals) / sum(times), 4),
              "graphs_captured": any(st.captured for st in backend._steps.values())}
    del loop, backend, cache, states
    gc.collect()  # the scheduler, backend and cache refer to each other: free the pool before the next arm
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--formats", default="fp8,int8,int4,int2")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.context, args.steps, args.layers = 4, 64, 8, 2
        torch.set_num_threads(1)  # tiny matrices: one thread beats two contended ones
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(args.seed)
    model = build_model(args, device, dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(3, model.shape.vocab_size, (args.context,), generator=gen).tolist()
               for _ in range(args.batch)]
    arms = []
    for fmt in [None, *[f for f in args.formats.split(",") if f]]:
        log(f"arm {fmt or 'bf16'}")
        arms.append(run_arm(model, args, fmt, prompts))
    base = arms[0]["step_ms"]
    for arm in arms:
        arm["speedup_vs_bf16"] = round(base / arm["step_ms"], 3)
    emit(NAME, {"quick": args.quick, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                "batch": args.batch, "context": args.context, "steps": args.steps, "layers": args.layers,
                "block_size": BS, "arms": arms, "kernel_goals": GOALS, "seal_goal_share": 0.05})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
