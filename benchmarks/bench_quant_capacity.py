"""Same KV memory budget, quantized pool vs bf16: tokens held, and the prefix hit rate of the serving chat workload.

Question: the pool budget counts storage bytes, so a quantized pool holds more tokens in the same bytes; how
many more (per format, for the Llama-3-8B and SmolLM2-135M KV shapes: head_dim 128 vs 64 changes the share of
the float16 scales), and how much does that raise the prefix hit rate of a serving workload once the pool is
small enough to evict?

Part 1 (`capacity`): bytes per 16-token block (`KVSpec.bytes_per_block`: codes and scales of every layer, K and
V) and tokens held per GiB of pool, each format against bf16.

Part 2 (`hit_rate`): the multi-turn chat workload of bench_serving (`serving_workloads.chat_workload` with its
defaults: 8 clients x 3 turns, 2 shared system prompts of 450 words of World English Bible text, 25-60-word user
turns, 32 new tokens a turn, seed 0), tokenized by SmolLM2's tokenizer, replayed through the engine's live path
(`Scheduler` -> `PagedLlamaBackend` -> `KVCacheManager`, pool sized by `max_memory` in bytes, no tier below it).
Turns are served one at a time in arrival order (conversation start + think times, service time taken as 0); a
turn's prompt is its system prompt, the earlier user turns and the replies the engine generated, and its new
user turn (token ids, no chat template). The model is a random Llama with SmolLM2's KV shape per layer (3 KV
heads of head_dim 64, bf16) but 2 layers, on the CPU: a block's bytes are 2/30 of SmolLM2's in every format, so
a budget of B bytes here holds exactly the blocks that B * 15 bytes hold for SmolLM2, and the hit rate depends
only on token counts (every turn generates its 32 tokens: no eos). Budgets are given in bf16 tokens (the pool
of the bf16 arm); each quantized arm gets the same bytes. Hit rate = tokens reused from the cache / prompt
tokens, over all turns; the unbounded pool's rate is the ceiling. Staging blocks of a quantized pool's running
sequence (full precision, the last partial block) live outside the pool budget (engine/staging.py).

--quick: 4 clients x 2 turns, 8 new tokens, two budgets; writes under $UAKV_RESULTS_DIR only (make bench).
A full run (CPU, about a minute) writes quant_capacity.json there (benchmarks/results/ by default).
Goal: fp8 holds >= 1.8x the tokens of bf16 in the same bytes, and raises the hit rate accordingly.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Any

import torch
from bench_common import bible_text, emit
from serving_workloads import ChatSpec, Conversation, chat_workload

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
from ultra_adaptive_kv_cache_engine.memory import KVSpec
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

NAME = "quant_capacity"
BS = 16
GOAL = 1.8
SHAPES = {"llama3_8b": (32, 8, 128), "smollm2_135m": (30, 3, 64)}  # layers, KV heads, head_dim
SMOL_VOCAB, SMOL_KV_HEADS, SMOL_HEAD_DIM, REPLAY_LAYERS = 49152, 3, 64, 2
CHAT_VERSES = (0, 6000)  # bench_serving's chat text


def log(msg: str) -> None:
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def capacity() -> dict[str, Any]:
    """Bytes per block and tokens per GiB of each format against bf16, per model shape."""
    out: dict[str, Any] = {}
    for model, (layers, heads, dim) in SHAPES.items():
        rows = {}
        for fmt in (None, *POOL_FORMATS):
            spec = KVSpec(layers, heads, dim, BS, torch.bfloat16, torch.device("cpu"), pool_format=fmt)
            rows[fmt or "bf16"] = {"bytes_per_block": spec.bytes_per_block,
                                   "tokens_per_gib": (2**30 // spec.bytes_per_block) * BS}
        base = rows["bf16"]["tokens_per_gib"]
        for row in rows.values():
            row["tokens_vs_bf16"] = round(row["tokens_per_gib"] / base, 4)
        out[model] = rows
    return out


def build_model(seed: int) -> PagedLlama:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=SMOL_KV_HEADS * SMOL_HEAD_DIM, num_attention_heads=SMOL_KV_HEADS,
                         num_key_value_heads=SMOL_KV_HEADS, intermediate_size=256, num_hidden_layers=REPLAY_LAYERS,
                         vocab_size=SMOL_VOCAB, max_position_embeddings=4096, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return PagedLlama.from_hf(model)


def tokenize_workload(conversations: list[Conversation]) -> list[dict[str, Any]]:
    """Each conversation's system and user turns as SmolLM2 token ids, with its turns' arrival times."""
    from transformers import AutoTokenizer

    from ultra_adaptive_kv_cache_engine.model.loader import resolve_model_folder

    tok = AutoTokenizer.from_pretrained(resolve_model_folder(KVCacheConfig(device="cpu")), local_files_only=True)
    out = []
    for c in conversations:
        arrivals, t = [], c.start_s
        for think in c.think_s:
            arrivals.append(t)
            t += think
        out.append({"system": tok.encode(c.system, add_special_tokens=False),
                    "users": [tok.encode(u, add_special_tokens=False) for u in c.users],
                    "arrivals": arrivals, "max_tokens": c.max_tokens})
    return out


def replay(model: PagedLlama, convs: list[dict[str, Any]], fmt: str | None, budget: int) -> dict[str, Any]:
    """Serves every turn in arrival order on a pool of `budget` bytes; the hit rate and what the pool held."""
    s = model.shape
    spec = KVSpec(s.num_layers, s.num_kv_heads, s.head_dim, BS, model.dtype, model.device, pool_format=fmt)
    config = KVCacheConfig(block_size=BS, device="cpu", kv_dtype=fmt, cpu_tier_bytes=0, max_memory=budget,
                           reject_non_finite=False)
    cache = KVCacheManager(config, spec)
    sched = SchedulerConfig(max_running=1, max_step_tokens=2048, admission_headroom=0.0)
    loop = StepLoop(Scheduler(PagedLlamaBackend(model, cache, sched), sched), threaded=False)
    turns = sorted((c["arrivals"][k], i, k) for i, c in enumerate(convs) for k in range(len(c["users"])))
    replies: dict[tuple[int, int], list[int]] = {}
    prompt_tokens = cached_tokens = 0
    for _, i, k in turns:
        c = convs[i]
        prompt = list(c["system"])
        for j in range(k):
            prompt += c["users"][j] + replies[(i, j)]
        prompt += c["users"][k]
        state = SequenceState(prompt=prompt, params=SamplingParams(max_new_tokens=c["max_tokens"]),
                              text=IncrementalText(lambda ids: ""), eos_token_id=None)
        loop.submit(state, lambda item: True)
        loop.run_until_idle()
        if len(state.generated) != c["max_tokens"]:
            raise RuntimeError(f"turn {k} of conversation {i} generated {len(state.generated)} tokens")
        replies[(i, k)] = list(state.generated)
        prompt_tokens += len(prompt)
        cached_tokens += int(state.cached_tokens or 0)
    result = {"kv_dtype": fmt or "bf16", "budget_bytes": budget, "pool_blocks": cache.budget.num_blocks,
              "pool_tokens": cache.budget.num_blocks * BS, "turns": len(turns), "prompt_tokens": prompt_tokens,
              "cached_tokens": cached_tokens, "hit_rate": round(cached_tokens / prompt_tokens, 4)}
    del loop, cache
    gc.collect()
    return result


def hit_rates(args: argparse.Namespace) -> dict[str, Any]:
    spec = ChatSpec(clients=args.clients, turns=args.turns, max_tokens=args.max_tokens)
    convs = tokenize_workload(chat_workload(spec, bible_text(CHAT_VERSES[1], CHAT_VERSES[0]), args.seed))
    model = build_model(args.seed)
    bf16 = KVSpec(REPLAY_LAYERS, SMOL_KV_HEADS, SMOL_HEAD_DIM, BS, torch.bfloat16, torch.device("cpu"))
    unique = sum(len(c["system"]) for c in convs[: spec.system_prompts]) + sum(
        len(u) + spec.max_tokens for c in convs for u in c["users"])
    ceiling = replay(model, convs, None, 1 << 30)
    log(f"unbounded pool: {ceiling}")
    rows = []
    for tokens in args.budgets:
        budget = tokens // BS * bf16.bytes_per_block
        arms = {}
        for fmt in (None, *args.formats):
            arms[fmt or "bf16"] = replay(model, convs, fmt, budget)
            log(f"budget {tokens} bf16 tokens, {fmt or 'bf16'}: {arms[fmt or 'bf16']}")
        base = arms["bf16"]
        for arm in arms.values():
            arm["tokens_vs_bf16"] = round(arm["pool_tokens"] / base["pool_tokens"], 4)
            arm["hit_rate_vs_bf16"] = round(arm["hit_rate"] / base["hit_rate"], 4) if base["hit_rate"] else None
        rows.append({"bf16_tokens": tokens, "smollm2_budget_bytes": budget * 30 // REPLAY_LAYERS, "arms": arms})
    return {"workload": {"clients": spec.clients, "turns": spec.turns, "system_prompts": spec.system_prompts,
                         "system_words": spec.system_words, "max_tokens": spec.max_tokens, "seed": args.seed,
                         "unique_tokens": unique},
            "replay_model": {"layers": REPLAY_LAYERS, "kv_heads": SMOL_KV_HEADS, "head_dim": SMOL_HEAD_DIM,
                             "vocab": SMOL_VOCAB, "dtype": "bfloat16"},
            "ceiling": ceiling, "budgets": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 1536, 2048, 3072],
                   help="pool budgets in tokens of the bf16 pool (the same bytes for every format)")
    p.add_argument("--formats", nargs="+", default=["fp8", "int4"], choices=list(POOL_FORMATS))
    args = p.parse_args(argv)
    if args.quick:
        args.clients, args.turns, args.max_tokens, args.budgets = 4, 2, 8, [768, 1536]
    torch.set_num_threads(1)  # tiny matrices: one thread beats two contended ones
    cap = capacity()
    goals = [{"model": m, "format": "fp8", "target_tokens_vs_bf16": GOAL, "value": rows["fp8"]["tokens_vs_bf16"],
              "met": rows["fp8"]["tokens_vs_bf16"] >= GOAL} for m, rows in cap.items()]
    result = {"quick": args.quick, "block_size": BS, "capacity": cap, "hit_rate": hit_rates(args), "goals": goals}
    emit(NAME + ("_quick" if args.quick else ""), result, save=not args.quick or "UAKV_RESULTS_DIR" in os.environ)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
