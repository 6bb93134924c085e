"""Prefix reuse with the real SmolLM2-135M-Instruct on CPU: our paged cache vs transformers' DynamicCache.

Question: with a long shared system prompt (about 1,024 tokens) followed by different questions, how much
of the time to first token does reusing the cached prefix save, and does decoding stay as fast?
Baseline, same run, same prompts: `model.generate` with its default DynamicCache and no reuse.
Ours: `generate_with_prefix_cache` with a paged cache warmed once with the system prompt, so every
question reuses it. Both are greedy; the outputs must be token-for-token identical (checked).
Measurements interleave baseline and ours question by question (shared noise); TTFT is the median over
questions, decode throughput is total decoded tokens (after the first) over total decode time.
The same comparison runs a second time with beam search (2 beams, 2 returned sequences): the prefix is
loaded into both beam rows from one pinned copy, and the outputs must again be identical.
Goals (greedy and beam search alike): hit TTFT <= 0.15 x miss TTFT; decode tokens/s >= 0.9 x DynamicCache.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from typing import Any

import torch
from bench_common import emit
from transformers import LogitsProcessorList

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.generation import FirstTokenClock, generate_with_prefix_cache
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.loader import load_model

WORDS = (
    "cache block token prefix model layer answer question always never kindly brief policy memory disk "
    "server request user assistant careful polite accurate short sentence explain reason data value"
).split()
QUESTIONS = [
    "What is the capital of France?",
    "Name a primary color.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "What do bees make?",
    "How many days are in a week?",
    "What is the opposite of hot?",
    "Which planet do we live on?",
]


def system_prompt(lm: LoadedModel, target_tokens: int, seed: int) -> str:
    """Seeded sentences until the system message reaches `target_tokens` tokens."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while len(lm.tokenizer.chat([{"role": "system", "content": " ".join(sentences)}], False)) < target_tokens:
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return " ".join(sentences)


BEAMS = {"num_beams": 2, "num_return_sequences": 2}


def baseline(lm: LoadedModel, ids: list[int], new_tokens: int, **mode: Any) -> tuple[torch.Tensor, float, float]:
    """(output, ttft_s, total_s) of plain generate with DynamicCache."""
    clock = FirstTokenClock()
    batch = torch.tensor([ids])
    start = time.perf_counter()
    out = lm.model.generate(
        batch,
        attention_mask=torch.ones_like(batch),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([clock]),
        **mode,
    )
    total = time.perf_counter() - start
    return out, (clock.first or start) - start, total


def compare(lm: LoadedModel, paged: KVCacheManager, prompts: list[list[int]], new_tokens: int, **mode: Any) -> dict[str, Any]:
    """Baseline and ours interleaved question by question: the figures of one generate mode."""
    miss_ttft, hit_ttft, cached, identical = [], [], [], True
    decode = {"dynamic": [0, 0.0], "paged": [0, 0.0]}
    for i, ids in enumerate(prompts):
        out, ttft, total = baseline(lm, ids, new_tokens, **mode)
        miss_ttft.append(ttft)
        decode["dynamic"][0] += out.shape[1] - len(ids) - 1
        decode["dynamic"][1] += total - ttft
        result = generate_with_prefix_cache(
            lm.model, paged, [ids], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **mode
        )
        hit_ttft.append(result.ttft_s)
        cached.append(result.cached_tokens)
        decode["paged"][0] += result.new_tokens - 1
        decode["paged"][1] += result.total_s - result.ttft_s
        identical &= torch.equal(out, result.output_ids)
        print(f"{'beam search' if mode else 'greedy'} q{i}: miss ttft {ttft:.3f}s, hit ttft {result.ttft_s:.3f}s, "
              f"cached {result.cached_tokens}", file=sys.stderr)
    ttft_miss, ttft_hit = statistics.median(miss_ttft), statistics.median(hit_ttft)
    dyn_tps = decode["dynamic"][0] / decode["dynamic"][1]
    paged_tps = decode["paged"][0] / decode["paged"][1]
    return {
        "cached_tokens": cached,
        "outputs_identical": bool(identical),
        "ttft_miss_s": round(ttft_miss, 4),
        "ttft_hit_s": round(ttft_hit, 4),
        "ttft_hit_over_miss": round(ttft_hit / ttft_miss, 4),
        "decode_tok_s_dynamic": round(dyn_tps, 2),
        "decode_tok_s_paged": round(paged_tps, 2),
        "decode_paged_over_dynamic": round(paged_tps / dyn_tps, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 questions, 8 new tokens (under a minute)")
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 gives stable ratios on shared CPUs, 0 = torch default"
    )
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/prefix_reuse.json")
    args = parser.parse_args()
    questions = QUESTIONS[: 3 if args.quick else args.questions]
    new_tokens = 8 if args.quick else args.new_tokens
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    config = KVCacheConfig(device="cpu", block_size=args.block_size)
    lm = load_model(config)
    spec = lm.kv_spec(args.block_size)
    paged = KVCacheManager(config, spec, num_blocks=-(-8192 // args.block_size), namespace=lm.namespace(spec))
    system = system_prompt(lm, args.system_tokens, args.seed)
    prompts = [lm.tokenizer.chat([{"role": "system", "content": system}, {"role": "user", "content": q}]) for q in questions]
    system_ids = lm.tokenizer.chat([{"role": "system", "content": system}], False)
    print(f"system prompt {len(system_ids)} tokens, {len(questions)} questions", file=sys.stderr)

    baseline(lm, prompts[0][-32:], 2)  # warm-up (allocator, kernels)
    generate_with_prefix_cache(lm.model, paged, [system_ids], max_new_tokens=1, do_sample=False)  # warm the cache

    greedy = compare(lm, paged, prompts, new_tokens)
    beam = compare(lm, paged, prompts, new_tokens, **BEAMS)
    emit(
        "prefix_reuse",
        {
            "model": lm.model_id,
            "quick": args.quick,
            "system_tokens": len(system_ids),
            "prompt_tokens": [len(p) for p in prompts],
            "questions": len(questions),
            "new_tokens": new_tokens,
            "block_size": args.block_size,
            **greedy,
            "ttft_goal": 0.15,
            "decode_goal": 0.9,
            "beam_search": {**BEAMS, **beam},
            "torch_threads": torch.get_num_threads(),
        },
        save=not args.no_save,
    )


if __name__ == "__main__":
    main()
