"""The `uakv route` and `uakv fleet-sim` commands (registered in cli.py): options and what each runs.

`uakv route` has one option per `RouterConfig` field, generated from the dataclass (none mapped by hand);
`--instances` takes a comma-separated list of URLs; `none` gives an optional field no value; the instances'
API key may come from UAKV_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from typing import Any

from ..policies.fleet.routing import ROUTING_POLICIES
from .config import RouterConfig

PARSERS: dict[str, Any] = {"str": str, "int": int, "float": float,
                           "str | None": lambda text: None if text.lower() == "none" else text,
                           "tuple[str, ...]": lambda text: tuple(u for u in text.split(",") if u)}
DEFAULT_TRACE = "../shared/data/traces/mooncake-fast25/conversation_trace.jsonl"


def route_parser(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("router: one option per RouterConfig field")
    for f in fields(RouterConfig):
        default = None if f.default is MISSING else f.default
        text = (f.metadata.get("help", "") + ("" if default in (None, ()) else f" (default {default!r})")).replace("%", "%%")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"router_{f.name}", type=PARSERS[str(f.type)],
                           default=argparse.SUPPRESS, help=text)


def router_config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(**{f.name: getattr(args, f"router_{f.name}") for f in fields(RouterConfig)
                           if hasattr(args, f"router_{f.name}")})


def cmd_route(args: argparse.Namespace) -> int:
    """`uakv route`: the router on host:port until SIGTERM or SIGINT."""
    import uvicorn

    from ..server.run import bind_socket
    from .app import create_router_app

    config = router_config_from_args(args).with_env(os.environ)
    app = create_router_app(config)
    sock = bind_socket(config.host, config.port)
    host, port = sock.getsockname()[:2]
    source = "digest" if app.state.router.tokenizer is not None else "text"
    print(f"uakv route: {config.policy} ({source}) over {len(config.instances)} instance(s) on http://{host}:{port}",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    sock.close()
    return 0


def fleet_sim_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", default=DEFAULT_TRACE, help=f"Mooncake-schema JSONL trace (default {DEFAULT_TRACE})")
    p.add_argument("--instances", default="1-128", help="fleet sizes: 1-128 (powers of two) or 1,4,16")
    p.add_argument("--routings", default=",".join(ROUTING_POLICIES), help="routing policies, comma-separated")
    p.add_argument("--local-tokens", default="3M", help="tokens each instance caches (default 3M)")
    p.add_argument("--global-tokens-per-instance", default="3M",
                   help="global tier tokens per instance (0: local caches only; default 3M: the fleet's pooled memory)")
    p.add_argument("--eviction", default="lru", help="eviction policy of every cache (default lru)")
    p.add_argument("--prefill-tokens-per-s", type=float, default=30_000.0, help="prefill rate of one instance")
    p.add_argument("--balance-abs", type=float, default=1.0, help="cache_aware: seconds of queued prefill over the "
                   "least loaded before the longest prefix yields (default 1.0)")
    p.add_argument("--balance-rel", type=float, default=1.5, help="cache_aware: ... and the factor (default 1.5)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per block id of the trace (default 512)")
    p.add_argument("--workers", type=int, default=1, help="processes simulating in parallel (default 1)")
    p.add_argument("--plot", help="write a PNG of hit rate and prefill saved against the number of instances")


def cmd_fleet_sim(args: argparse.Namespace) -> int:
    """`uakv fleet-sim`: one JSON line per fleet (policies/fleet/)."""
    from ..policies.fleet import (
        FleetSpec,
        FleetSweep,
        load_compiled,
        parse_sizes,
        parse_tokens,
        plot_fleet,
        run_fleet,
    )

    trace, arrivals = load_compiled(args.trace, args.block_tokens)
    options = {"balance_abs": args.balance_abs, "balance_rel": args.balance_rel}
    template = FleetSpec(1, parse_tokens(args.local_tokens), eviction=args.eviction,
                         prefill_tokens_per_s=args.prefill_tokens_per_s, routing_options=options)
    sweep = FleetSweep(parse_sizes(args.instances), tuple(r for r in args.routings.split(",") if r), template,
                       parse_tokens(args.global_tokens_per_instance), args.workers)
    results = run_fleet(trace, arrivals, sweep)
    for r in results:
        print(json.dumps(r.as_dict()))
    if args.plot:
        plot_fleet(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
