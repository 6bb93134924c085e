"""`uakv serve` options, one per `ServerConfig` field, generated from the dataclass (`--host`, `--port`,
`--api-key`, `--max-queue`, ...); none is mapped by hand. `server_config_from_args` builds the config from
the options given and reads `UAKV_API_KEY` when `--api-key` is not given."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import MISSING, fields
from typing import Any

from .config import ServerConfig

# How an option's text becomes the field's value, and its metavar, by the field's annotation.
PARSERS: dict[str, Callable[[str], Any]] = {"str": str, "str | None": str, "int": int, "int | None": int,
                                            "float": float}
METAVARS = {str: "TEXT", int: "N", float: "X"}


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` option per ServerConfig field (left unset when not given)."""
    group = parser.add_argument_group("server: one option per ServerConfig field")
    for f in fields(ServerConfig):
        if f.type not in PARSERS:
            raise TypeError(f"ServerConfig.{f.name}: annotation {f.type!r} has no option parser; known: "
                            f"{', '.join(PARSERS)}")
        default = None if f.default is MISSING else f.default
        text = f.metadata.get("help", "") + ("" if default is None else f" (default {default!r})")
        text = text.replace("%", "%%")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f"server_{f.name}", type=PARSERS[f.type],
                           default=argparse.SUPPRESS, help=text, metavar=METAVARS[PARSERS[f.type]])


def server_config_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The ServerConfig of the options given (the dataclass's defaults for the rest), then UAKV_API_KEY."""
    given = {f.name: getattr(args, f"server_{f.name}") for f in fields(ServerConfig)
             if hasattr(args, f"server_{f.name}")}
    return ServerConfig(**given).with_env(os.environ if environ is None else environ)
