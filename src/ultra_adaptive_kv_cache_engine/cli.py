"""`uakv`: the command line. One function per command, registered in COMMANDS (no if/elif dispatch).

Commands:
  demo      what `make run` shows: the cache API, then a scripted multi-turn chat with the embedded model,
            each answer with its cached tokens and time to first token
  generate  one completion for PROMPT
  chat      interactive multi-turn chat; each turn shows cached tokens and TTFT
  info      model, cache configuration and sizes
  config    the effective configuration as TOML, each value with its source (default, file, env, flag)
  replay    replay a request trace through the eviction policies (hit rates against Belady's bound)
  serve     an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics) over the engine
  route     a KV-aware router in front of several `uakv serve` instances (router/)
  fleet-sim a fleet of caches and routing policies simulated on a trace (policies/fleet/)
The commands that build an engine take one option per KVCacheConfig field, generated from the field table of
`config_sources` (which also reads `UAKV_*` variables and `--config FILE.toml`); none is mapped by hand here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import torch

from .config import KVCacheConfig
from .config_sources import ResolvedConfig, field_table, resolve_config, to_toml
from .engine.engine import UltraAdaptiveKVCacheEngine
from .router.commands import cmd_fleet_sim, cmd_route, fleet_sim_parser, route_parser
from .types import CacheStrategy

Command = Callable[[argparse.Namespace], int]
# A command's own defaults, between the dataclass's and the file's: the demo answers in 40 tokens.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {"demo": {"max_new_tokens": 40}}


def resolved_from_args(args: argparse.Namespace) -> ResolvedConfig:
    """The config from the options given > UAKV_* variables > --config FILE > the command's defaults."""
    flags = {f.name: getattr(args, f.name) for f in field_table() if hasattr(args, f.name)}
    return resolve_config(flags, args.config_file, os.environ, COMMAND_DEFAULTS.get(args.command))


def config_from_args(args: argparse.Namespace) -> KVCacheConfig:
    return resolved_from_args(args).config


def _print_turn(prefix: str, result: dict[str, Any]) -> None:
    print(f"{prefix}{result['text'].strip()}")
    print(
        f"    [prompt {result['prompt_tokens']} tokens, cached {result['cached_tokens']}, "
        f"ttft {result['ttft_ms']:.0f} ms, {result['completion_tokens']} new tokens in {result['latency_ms']:.0f} ms]"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    print("== 1. The cache API: store and retrieve tensors by content ==")
    engine = UltraAdaptiveKVCacheEngine(KVCacheConfig(max_tokens=64, cache_strategy=CacheStrategy.LRU))
    keys = [torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(i)) for i in range(10)]
    for k in keys:
        engine.store(k, k * 2)
    held = sum(engine.retrieve(k) is not None for k in keys)
    print(f"stored 10 entries of 8 tokens in a 64-token LRU cache: {held} still held, "
          f"stats {json.dumps(engine.cache.stats())}")
    print("\n== 2. A multi-turn chat with the embedded model: each turn reuses the cached prefix ==")
    with UltraAdaptiveKVCacheEngine(config_from_args(args)) as engine:
        messages: list[dict[str, str]] = [{"role": "system", "content": DEMO_SYSTEM}]
        for question in DEMO_QUESTIONS:
            messages.append({"role": "user", "content": question})
            result = asyncio.run(engine.process_request({"action": "process", "messages": messages, "seed": 0}))
            print(f"\nuser> {question}")
            _print_turn("assistant> ", result)
            messages.append({"role": "assistant", "content": result["text"]})
        stats = engine.get_stats()["model"]
    print(f"\n{stats['requests']} requests, {stats['prompt_tokens']} prompt tokens, {stats['cached_tokens']} of them "
          f"served from the cache ({stats['token_hit_rate']:.0%}); {stats['indexed_blocks']} blocks of "
          f"{stats['block_size']} tokens cached")
    return 0


DEMO_SYSTEM = (
    "You are a concise assistant. Answer in one or two sentences. You are helping a new engineer understand "
    "how a key-value cache speeds up language model inference by reusing the attention keys and values of a "
    "prompt prefix that was already computed, instead of computing it again for every request. Background you "
    "may use: a transformer computes, for every token of the prompt and at every layer, a key vector and a "
    "value vector; later tokens attend to all earlier keys and values. Computing them for a long prompt is the "
    "prefill, and it dominates the time to the first token. When many requests begin with the same text, such "
    "as a long system prompt, the previous turns of a conversation, a shared document in retrieval-augmented "
    "generation, or the tool descriptions of an agent, the keys and values of that common prefix are the same "
    "every time. A prefix cache splits the prompt into blocks of a fixed number of tokens, names each block by "
    "a cryptographic hash of its tokens and of every block before it, and keeps the blocks in memory, on disk "
    "or in a shared store. A new request looks up the longest run of blocks it already has and computes only "
    "the rest. Blocks that are not used for a while are evicted by a policy such as least recently used, or "
    "by an adaptive policy that learns from the workload which blocks are worth keeping."
)
DEMO_QUESTIONS = (
    "What is a KV cache?",
    "Why does reusing a prefix make the first token arrive sooner?",
    "Give one example of a workload where many requests share a prefix.",
)


def cmd_generate(args: argparse.Namespace) -> int:
    request = {"action": "process", "text": args.prompt, "temperature": args.temperature, "top_p": args.top_p,
               "seed": args.seed}
    with UltraAdaptiveKVCacheEngine(config_from_args(args)) as engine:
        result = asyncio.run(engine.process_request(request))
    if args.json:
        print(json.dumps(result))
    else:
        _print_turn("", result)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    with UltraAdaptiveKVCacheEngine(config_from_args(args)) as engine:
        return _chat_loop(engine, args)


def _chat_loop(engine: UltraAdaptiveKVCacheEngine, args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("uakv chat: type a message, an empty line or /exit to quit, /reset to start over.")
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line or line == "/exit":
            break
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        result = asyncio.run(engine.process_request(
            {"action": "process", "messages": messages, "temperature": args.temperature, "top_p": args.top_p,
             "seed": args.seed}))
        _print_turn("assistant> ", result)
        messages.append({"role": "assistant", "content": result["text"]})
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with UltraAdaptiveKVCacheEngine(config_from_args(args)) as engine:
        print(json.dumps(engine.describe(), indent=2, default=str))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(resolved_from_args(args)), end="")
    return 0


def _parse_capacity(text: str) -> int:
    """'3M' -> 3_000_000, '500k' -> 500_000, '2048' -> 2048 (tokens)."""
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:].lower(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"capacity {text!r} is not a number of tokens such as 3M, 500k or 2048") from None
    if value < 1:
        raise ValueError(f"capacity {text!r} must be at least one token")
    return int(value)


def cmd_replay(args: argparse.Namespace) -> int:
    from .policies.replay import WORKLOADS, WorkloadSpec, generate_workload, plot_hit_rates, run_replay

    capacities = [_parse_capacity(c) for c in args.capacities.split(",") if c]
    policies = [p for p in args.policies.split(",") if p]
    if args.trace:
        trace, name = args.trace, None
    else:
        if args.workload not in WORKLOADS:
            raise ValueError(f"workload {args.workload!r} is unknown; expected one of: {', '.join(sorted(WORKLOADS))}")
        trace = generate_workload(args.workload, WorkloadSpec(requests=args.requests, seed=args.seed,
                                                             block_tokens=args.block_tokens))
        name = f"synthetic-{args.workload}"
    results = run_replay(trace, capacities, policies, block_tokens=args.block_tokens, workers=args.workers, name=name)
    for r in results:
        print(json.dumps(r.as_dict()))
    if args.plot:
        plot_hit_rates(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0


def _replay_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", help="Mooncake-schema JSONL trace (default: a generated synthetic workload)")
    p.add_argument("--workload", default="mix", help="synthetic workload when no --trace: chat, system, rag, agent, mix")
    p.add_argument("--requests", type=int, default=5000, help="requests of the synthetic workload (default 5000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload (default 0)")
    p.add_argument("--capacities", default="0.5M,1M,3M,10M,25M", help="cache sizes in tokens, comma-separated")
    p.add_argument("--policies", default="lru,lfu,fifo,s3fifo,arc,adaptive,belady",
                   help="registry names, comma-separated; 'belady' is the offline optimum")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per block id of the trace (default 512)")
    p.add_argument("--workers", type=int, default=1, help="processes replaying in parallel (default 1)")
    p.add_argument("--plot", help="write a PNG of hit rate against capacity here")


def cmd_serve(args: argparse.Namespace) -> int:
    from .compression.presses import parse_press
    from .server.options import server_config_from_args
    from .server.run import serve_command

    config = config_from_args(args)
    parse_press(config.kv_press)  # a bad --kv-press fails before the server starts
    return serve_command(config, server_config_from_args(args))


def _serve_parser(p: argparse.ArgumentParser) -> None:
    from .server.options import add_server_options

    _add_global_options(p, "serve")
    add_server_options(p)


EXTRA_PARSERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {"replay": _replay_parser,
                                                                       "serve": _serve_parser,
                                                                       "route": route_parser,
                                                                       "fleet-sim": fleet_sim_parser}
EXTRA_HELP: dict[str, str] = {"replay": "replay a request trace through the policies, against Belady's bound",
                              "serve": "an OpenAI-compatible HTTP server over the engine (uakv serve --port 8000)",
                              "route": "a KV-aware router in front of uakv serve instances (uakv route --instances ...)",
                              "fleet-sim": "simulate a fleet: routing policies x instances, with and without a global tier"}

COMMANDS: dict[str, Command] = {
    "demo": cmd_demo,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "info": cmd_info,
    "config": cmd_config,
    "replay": cmd_replay,
    "serve": cmd_serve,
    "route": cmd_route,
    "fleet-sim": cmd_fleet_sim,
}
# argparse keywords per kind of field: a boolean is a switch with a --no- form; every other field takes text.
OPTION_KWARGS: dict[str, dict[str, Any]] = {"bool": {"action": argparse.BooleanOptionalAction}}


def _add_global_options(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("configuration: one option per KVCacheConfig field; precedence: option > "
                             "environment variable > --config file > default")
    g.add_argument("--config", dest="config_file", metavar="FILE.toml",
                   help="TOML file of KVCacheConfig fields (a [[tiers]] table per tier); `uakv config` writes one")
    for f in field_table():
        default = f.kind.format(COMMAND_DEFAULTS.get(command, {}).get(f.name, f.default)) or '""'
        text = f"{f.help} (default {default}; env {f.env})".replace("%", "%%")
        g.add_argument(f.option, *f.aliases, dest=f.name, default=argparse.SUPPRESS, help=text,
                       metavar=f.kind.metavar, **OPTION_KWARGS.get(f.kind.name, {}))


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uakv", description="ultra-adaptive-kv-cache: a KV cache engine for LLMs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="cache API demo, then a multi-turn chat with the embedded model")
    _add_global_options(p, "demo")
    p = sub.add_parser("generate", help="one completion for PROMPT")
    p.add_argument("prompt")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    _add_global_options(p, "generate")
    _add_sampling(p)
    p = sub.add_parser("chat", help="interactive multi-turn chat showing cached tokens and TTFT per turn")
    p.add_argument("--system", help="system prompt")
    _add_global_options(p, "chat")
    _add_sampling(p)
    p = sub.add_parser("info", help="model, cache configuration and sizes")
    _add_global_options(p, "info")
    p = sub.add_parser("config", help="the effective configuration as TOML, each value with its source")
    _add_global_options(p, "config")
    for name, extend in EXTRA_PARSERS.items():
        extend(sub.add_parser(name, help=EXTRA_HELP[name]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as exc:
        print(f"uakv {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
