"""Serving under load: `uakv serve` against `transformers serve --continuous-batching`, same model, same run.

Question: on this machine, with the embedded SmolLM2 on the CPU, how much more output per second and how much
sooner a first token does our server give than transformers' own continuous-batching server, under (a) 8
concurrent multi-turn chat clients sharing a few long system prompts and (b) an arrival replay of the Azure
LLM inference trace (conversation), time-scaled to the machine?

Both servers are subprocesses on free loopback ports, started together and stopped by pid (even on errors).
The baseline serves the same safetensors folder our loader converted (`resolve_model_folder`), with the same
KV memory (`--pool-bytes`: our `--max-memory`, its `--cb-num-blocks` of 256-token pages) and the same tokens
per step (our scheduler's `max_step_tokens` as its `--cb-max-batch-tokens`). Same client for both (asyncio +
httpx, streamed, open-loop arrivals, serving_client.py), same greedy sampling and max_tokens. Each round runs
every workload on both servers, ours first in even rounds (two rounds by default, so the order alternates
against the drift of a shared machine), on fresh seeded text; figures pool the rounds, and the 1-minute load
average at the start of each phase is recorded.
The run ends by `--time-budget-s`: a phase (one workload on one server) still running at its share of it is
cut (its unanswered requests count as errors, and `phases` says so); figures are over what was sent.
Reductions: serving_stats.py; workloads: serving_workloads.py. The first turns (same prompt on both) are
compared: greedy answers should match.
Goals (CPU, SmolLM2, 8 chat clients): output tok/s >= 1.5x the baseline's; TTFT p50 <= 0.5x the baseline's.
If `transformers serve` cannot run, `baseline_error` says why and in-process `generate_batch` over the chat
workload's first turns stands in for its output tok/s. `--gpu` (serving_gpu.py): Llama-3-8B shape on a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_common import bible_text, emit
from serving_stats import RATIO_KEYS, RequestRecord, first_answers_identical, goal, ratios, summarize
from serving_workloads import ChatSpec, TraceSpec, chat_workload, read_trace, trace_workload

NAME = "serving"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = Path("shared/data/traces/azure-llm-2023/AzureLLMInferenceTrace_conv.csv")  # under REPO.parent
CHAT_VERSES, TRACE_VERSES = (0, 6000), (12000, 4000)  # disjoint (start, count) regions of the text


def log(msg: str) -> None:
    print(f"[{NAME} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 round, 4 clients x 2 turns, 6 trace requests (~1 min)")
    p.add_argument("--gpu", action="store_true", help="the GPU mode (serving_gpu.py): Llama-3-8B shape, 64 clients")
    p.add_argument("--dry-run-cpu", action="store_true", help="with --gpu: a tiny random Llama on the CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds of every workload on both servers, the order alternating (default 2; quick 1)")
    p.add_argument("--workloads", default="chat,trace", help="comma-separated: chat, trace")
    p.add_argument("--clients", type=int, default=8, help="chat: concurrent conversations (quick 4)")
    p.add_argument("--turns", type=int, default=None, help="chat: turns per conversation (default 3; quick 2)")
    p.add_argument("--system-prompts", type=int, default=2, help="chat: distinct system prompts shared by clients")
    p.add_argument("--system-words", type=int, default=450, help="chat: words of real text per system prompt")
    p.add_argument("--max-tokens", type=int, default=None, help="chat: max_tokens per turn (default 32; quick 8)")
    p.add_argument("--think-s", type=float, default=None, help="chat: mean think time (default 1.0; quick 0.3)")
    p.add_argument("--start-gap-s", type=float, default=0.5, help="chat: mean gap between conversation starts")
    p.add_argument("--trace", type=Path, default=None, help=f"trace CSV (default: ../{DEFAULT_TRACE} from the repo)")
    p.add_argument("--trace-start", type=int, default=0, help="first trace row replayed")
    p.add_argument("--trace-requests", type=int, default=None, help="trace rows replayed (default 12; quick 6)")
    p.add_argument("--time-scale", type=float, default=4.0, help="trace: arrival gaps multiplied by this")
    p.add_argument("--length-scale", type=float, default=0.25, help="trace: prompt tokens = ContextTokens x this")
    p.add_argument("--output-scale", type=float, default=0.25, help="trace: max_tokens = GeneratedTokens x this")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="trace: prompt cap (default 512; quick 256)")
    p.add_argument("--max-output-tokens", type=int, default=None, help="trace: max_tokens cap (default 32; quick 8)")
    p.add_argument("--pool-bytes", type=int, default=512 * 2**20, help="KV memory of each server (bytes)")
    p.add_argument("--ours-args", default="", help="extra `uakv serve` options (one string)")
    p.add_argument("--baseline-args", default="", help="extra `transformers serve` options (one string)")
    p.add_argument("--ready-timeout-s", type=float, default=300.0)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="the run's deadline: later phases are cut or skipped (default 540; quick 150; GPU 450)")
    p.add_argument("--no-save", action="store_true", help="only print the JSON line")
    # GPU mode sizes (serving_gpu.py)
    p.add_argument("--gpu-clients", type=int, default=None, help="default 64; dry run 8")
    p.add_argument("--gpu-prompt-tokens", type=int, default=None, help="default 512; dry run 64")
    p.add_argument("--gpu-new-tokens", type=int, default=None, help="default 128; dry run 16")
    p.add_argument("--gpu-client-procs", type=int, default=None,
                   help="processes the HTTP clients run in (default 4; dry run 1)")
    p.add_argument("--gpu-rounds", type=int, default=2, help="requests per client (the runner: batches of 64)")
    p.add_argument("--gpu-block-size", type=int, default=16)
    p.add_argument("--gpu-pool-bytes", type=int, default=None, help="our server's KV pool (default 16 GiB; dry 64 MiB)")
    p.add_argument("--init-std", type=float, default=0.02)
    args = p.parse_args(argv)
    q = args.quick
    args.rounds = args.rounds or (1 if q else 2)
    args.clients = 4 if q and args.clients == 8 else args.clients
    args.turns = args.turns or (2 if q else 3)
    args.max_tokens = args.max_tokens or (8 if q else 32)
    args.think_s = args.think_s if args.think_s is not None else (0.3 if q else 1.0)
    args.trace_requests = args.trace_requests or (6 if q else 12)
    args.max_prompt_tokens = args.max_prompt_tokens or (256 if q else 512)
    args.max_output_tokens = args.max_output_tokens or (8 if q else 32)
    args.time_budget_s = args.time_budget_s or (450.0 if args.gpu else 150.0 if q else 540.0)
    dry = args.dry_run_cpu
    args.gpu_pool_bytes = args.gpu_pool_bytes or (64 * 2**20 if dry else 16 * 2**30)
    args.gpu_clients = args.gpu_clients or (8 if dry else 64)
    args.gpu_prompt_tokens = args.gpu_prompt_tokens or (64 if dry else 512)
    args.gpu_new_tokens = args.gpu_new_tokens or (16 if dry else 128)
    args.gpu_client_procs = args.gpu_client_procs or (1 if dry else 4)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"chat", "trace"}:
        p.error(f"--workloads={','.join(args.workloads)!r}: expected a comma-separated subset of chat,trace")
    args.trace = args.trace or REPO.parent / DEFAULT_TRACE
    return args


def build_workloads(args: argparse.Namespace, tokenizer: Any, rnd: int) -> dict[str, Any]:
    """Round `rnd`'s workloads (the same for both servers)."""
    seed = args.seed * 1000 + rnd
    out: dict[str, Any] = {}
    if "chat" in args.workloads:
        spec = ChatSpec(args.clients, args.turns, args.system_prompts, args.system_words, (25, 60), args.max_tokens,
                        args.think_s, args.start_gap_s)
        out["chat"] = chat_workload(spec, bible_text(CHAT_VERSES[1], CHAT_VERSES[0]), seed)
    if "trace" in args.workloads:
        rows = read_trace(args.trace, args.trace_start, args.trace_requests)
        spec = TraceSpec(args.time_scale, args.length_scale, args.output_scale, 16, args.max_prompt_tokens,
                         args.max_output_tokens)
        tokens = tokenizer.encode(bible_text(TRACE_VERSES[1], TRACE_VERSES[0]), add_special_tokens=False)
        out["trace"] = trace_workload(rows, spec, tokens, tokenizer.decode, seed)
    return out


async def warm_up(url: str, model: str) -> None:
    """One request, then four at once, on text no workload uses (loads kernels, starts batching managers)."""
    from serving_client import run_completions

    prompts = [f"Count from {i} to {i + 9}, then name a colour." for i in range(5)]
    await run_completions(url, model, prompts[:1], 4, 1, "warm", "warm", 0)
    await run_completions(url, model, prompts[1:], 4, 4, "warm", "warm", 0)


async def run_workload(name: str, work: Any, url: str, model: str, server: str, rnd: int,
                       records: list[RequestRecord], timeout_s: float) -> bool:
    """Runs one workload on one server, appending to `records`; False when it was cut at `timeout_s` (its
    unanswered requests are then marked as errors)."""
    from serving_client import run_conversations, run_trace

    run = run_conversations if name == "chat" else run_trace
    try:
        await asyncio.wait_for(run(url, model, work, server, rnd, records), timeout_s)
        return True
    except TimeoutError:
        for r in records:
            if r.server == server and r.round == rnd and r.workload == name and r.done_s is None and not r.error:
                r.error = f"cut: not answered within the time budget ({timeout_s:.0f} s for the phase)"
        return False


def baseline_sizes(args: argparse.Namespace, folder: Path) -> dict[str, int]:
    """transformers' continuous-batching sizes matching ours: the KV bytes of `--pool-bytes` in its 256-token
    pages (float32 KV), and our scheduler's tokens per step."""
    from ultra_adaptive_kv_cache_engine.engine.scheduler_config import SchedulerConfig

    config = json.loads((folder / "config.json").read_text())
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    token_bytes = 2 * config["num_hidden_layers"] * config.get("num_key_value_heads", heads) * head_dim * 4
    page = 256  # transformers' default page size (tokens per block)
    return {"num_blocks": max(1, args.pool_bytes // (page * token_bytes)),
            "max_batch_tokens": SchedulerConfig().max_step_tokens}


def server_pair(args: argparse.Namespace, folder: Path, logs: Path) -> dict[str, Any]:
    """Both servers (not started), with the options that size them alike."""
    from serving_servers import ServerProcess, baseline_argv, free_port, ours_argv

    cb = baseline_sizes(args, folder)
    ours_opts = ["--max-memory", str(args.pool_bytes), *shlex.split(args.ours_args)]
    base_opts = ["--cb-num-blocks", str(cb["num_blocks"]), "--cb-max-batch-tokens", str(cb["max_batch_tokens"]),
                 *shlex.split(args.baseline_args)]
    p1, p2 = free_port(), free_port()
    return {"ours": ServerProcess("uakv serve", ours_argv(p1, ours_opts), p1, logs / "ours.log"),
            "baseline": ServerProcess("transformers serve", baseline_argv(p2, folder, base_opts), p2,
                                      logs / "baseline.log", stop_signal=signal.SIGINT),
            "options": {"ours": "uakv serve --device cpu " + shlex.join(ours_opts),
                        "baseline": "transformers serve --continuous-batching --device cpu " + shlex.join(base_opts)}}


def fallback_baseline(folder: Path, tokenizer: Any, conversations: Any, max_tokens: int,
                      cb: dict[str, int]) -> dict[str, Any]:
    """In-process `generate_batch` over the chat workload's first turns (output tok/s only)."""
    import torch
    from serving_hf import generate_batch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": c.system},
                                              {"role": "user", "content": c.users[0]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for c in conversations]
    return generate_batch(model, prompts, max_tokens, cb, pad_token_id=tokenizer.pad_token_id or 0)


def start_servers(servers: dict[str, Any], args: argparse.Namespace, result: dict[str, Any]) -> dict[str, str]:
    """Starts both, waits for both, warms both up; the model id each serves. A baseline that cannot run is
    reported in `baseline_error`; ours failing raises."""
    for s in servers.values():
        s.start()
    models = {}
    for key, s in servers.items():
        try:
            result["servers"][key]["ready_s"] = round(s.wait_ready(args.ready_timeout_s), 1)
            models[key] = asyncio.run(get_model(s.url))
            asyncio.run(warm_up(s.url, models[key]))
        except Exception as exc:
            if key == "ours":
                raise
            result["baseline_error"] = f"{type(exc).__name__}: {exc}"[:1500]
            log(f"baseline unavailable: {result['baseline_error']}")
    return models


def run_rounds(args: argparse.Namespace, tokenizer: Any, servers: dict[str, Any], models: dict[str, str],
               result: dict[str, Any], records: list[RequestRecord]) -> None:
    """Every round: every workload on every server that runs, ours first in even rounds. Each phase (one
    workload on one server) ends by the run's deadline less a reserve for each phase after it; a phase with
    too little time left is skipped; both are named in `result["phases"]`."""
    deadline = result["_start"] + args.time_budget_s
    reserve = 10.0 if args.quick else 40.0
    plan = [(rnd, name, key) for rnd in range(args.rounds) for name in args.workloads
            for key in (["ours", "baseline"] if rnd % 2 == 0 else ["baseline", "ours"]) if key in models]
    work: dict[tuple[int, str], Any] = {}
    for i, (rnd, name, key) in enumerate(plan):
        timeout = deadline - time.monotonic() - reserve * (len(plan) - i - 1)
        phase: dict[str, Any] = {"round": rnd, "workload": name, "server": key,
                                 "load_avg_1m": round(os.getloadavg()[0], 2)}
        result["phases"].append(phase)
        if timeout < reserve / 2:
            phase["skipped"] = f"{timeout:.0f} s left for it within the time budget"
            log(f"round {rnd}: {name} on {key} skipped ({phase['skipped']})")
            continue
        if (rnd, name) not in work:
            work.update({(rnd, n): w for n, w in build_workloads(args, tokenizer, rnd).items()})
        log(f"round {rnd}: {name} on {key} (at most {timeout:.0f} s)")
        began = time.monotonic()
        done = asyncio.run(run_workload(name, work[rnd, name], servers[key].url, models[key], key, rnd, records,
                                        timeout))
        phase.update(seconds=round(time.monotonic() - began, 1), planned=len(_requests(work[rnd, name])),
                     sent=sum(r.server == key and r.round == rnd and r.workload == name for r in records))
        if not done:
            phase["cut"] = True
            time.sleep(2.0)  # let the server notice the closed streams before the next phase


def _requests(items: Any) -> list[Any]:
    """The requests a workload plans: every turn of every conversation, or every trace request."""
    return [t for c in items for t in c.users] if items and hasattr(items[0], "users") else list(items)


def run_cpu(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from ultra_adaptive_kv_cache_engine.config import KVCacheConfig
    from ultra_adaptive_kv_cache_engine.model.loader import resolve_model_folder

    start = time.monotonic()
    folder = resolve_model_folder(KVCacheConfig())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    result: dict[str, Any] = {"mode": "cpu", "quick": args.quick, "seed": args.seed, "model": folder.name,
                              "settings": settings(args), "baseline_error": None, "errors": {},
                              "phases": [], "_start": start}
    records: list[RequestRecord] = []
    with tempfile.TemporaryDirectory(prefix="uakv-bench-serving-") as tmp:
        pair = server_pair(args, folder, Path(tmp))
        servers = {k: pair[k] for k in ("ours", "baseline")}
        result["servers"] = {k: {"command": pair["options"][k]} for k in servers}
        try:
            models = start_servers(servers, args, result)
            run_rounds(args, tokenizer, servers, models, result, records)
        except Exception as exc:  # reported in the JSON line with whatever was measured before it
            result["errors"]["run"] = f"{type(exc).__name__}: {exc}"[:1500]
            log(f"failed: {result['errors']['run']}")
        finally:
            for key, s in servers.items():
                result["servers"][key]["exit_status"] = s.stop()
    del result["_start"]
    result["workloads"] = reduce(records, args.workloads)
    if result["baseline_error"] and "chat" in args.workloads:
        work = build_workloads(args, tokenizer, 0)["chat"]
        result["fallback_baseline"] = fallback_baseline(folder, tokenizer, work, args.max_tokens,
                                                        baseline_sizes(args, folder))
    result["first_answers_identical"] = first_answers_identical(records, "ours", "baseline")
    result["goals"] = goals(result)
    result["total_s"] = round(time.monotonic() - start, 1)
    return scrub(result, {str(folder): "<model folder>", str(REPO): "<repo>", str(Path.home()): "~"})


def scrub(value: Any, paths: dict[str, str]) -> Any:
    """`value` with this machine's paths (in error messages and log tails) replaced by placeholders."""
    if isinstance(value, str):
        for path, name in paths.items():
            value = value.replace(path, name)
        return value
    if isinstance(value, dict):
        return {k: scrub(v, paths) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, paths) for v in value]
    return value


async def get_model(url: str) -> str:
    from serving_client import get_model_id

    return await get_model_id(url)


def reduce(records: list[RequestRecord], workloads: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in workloads:
        ours = summarize([r for r in records if r.workload == name and r.server == "ours"])
        base = summarize([r for r in records if r.workload == name and r.server == "baseline"])
        out[name] = {"ours": ours, "baseline": base, "ours_over_baseline": ratios(ours, base, RATIO_KEYS)}
    return out


def goals(result: dict[str, Any]) -> list[dict[str, Any]]:
    chat = result["workloads"].get("chat")
    if chat is None:
        return []
    r = chat["ours_over_baseline"]
    tok_s = r["output_tok_s"]
    fallback = result.get("fallback_baseline") or {}
    if tok_s is None and fallback.get("output_tok_s") and chat["ours"]["output_tok_s"]:
        tok_s = round(chat["ours"]["output_tok_s"] / fallback["output_tok_s"], 4)
    label = (f"chat ({result['settings']['clients']} clients, multi-turn): output tok/s ours / transformers serve "
             "--continuous-batching")
    return [goal(label, tok_s, ">= 1.5"),
            goal("chat: TTFT p50 ours / transformers serve --continuous-batching", r["ttft_ms_p50"], "<= 0.5")]


def settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("rounds", "workloads", "clients", "turns", "system_prompts", "system_words", "max_tokens", "think_s",
            "start_gap_s", "trace_start", "trace_requests", "time_scale", "length_scale", "output_scale",
            "max_prompt_tokens", "max_output_tokens", "pool_bytes")
    return {"trace_file": args.trace.name, **{k: getattr(args, k) for k in keys}}


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` that stops the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminated)
    if args.gpu:
        from serving_gpu import run_gpu

        result, name = run_gpu(args), NAME + "_gpu" + ("_dry_run" if args.dry_run_cpu else "")
    else:
        result, name = run_cpu(args), NAME
    # Only a full run writes benchmarks/results/; quick and dry runs only where UAKV_RESULTS_DIR points.
    partial = args.quick or args.dry_run_cpu or "setup" in result.get("errors", {})
    emit(name, result, save=not args.no_save and (not partial or bool(os.environ.get("UAKV_RESULTS_DIR"))))
    return 0 if not result.get("errors") else 1


if __name__ == "__main__":
    sys.exit(main())
