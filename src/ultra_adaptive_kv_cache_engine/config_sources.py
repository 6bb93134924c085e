"""Where a `KVCacheConfig` comes from: `uakv` options, `UAKV_*` environment variables, a TOML file, defaults.

The field table is derived from `dataclasses.fields(KVCacheConfig)`, never written by hand: each field gets an
option (`max_tokens` -> `--max-tokens`), an environment name (`UAKV_MAX_TOKENS`), a `ValueKind` (text parser and
formatter, from its type hint through `VALUE_KINDS`, or `UNITS` when its metadata says `"unit": "bytes"`) and the
help text of its metadata. Precedence: option > environment > file > defaults (a command's, then the
dataclass's). Each value is validated by `KVCacheConfig` itself as soon as it is read, so a bad one raises
`ValueError` naming its source (option, variable, or file and key), the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from .config import KVCacheConfig, TierConfig
from .types import parse_enum

ENV_PREFIX = "UAKV_"
# UAKV_* variables that are not fields (the cache root, where benchmarks write, the server's API key): never
# taken for typos. A caller with variables of its own passes them as `other_env`.
NON_FIELD_ENV = frozenset({"UAKV_CACHE_DIR", "UAKV_RESULTS_DIR", "UAKV_API_KEY"})
# Short options kept from the first `uakv`; each field's full option works too.
OPTION_ALIASES: dict[str, tuple[str, ...]] = {
    "model_path": ("--model",), "cache_strategy": ("--strategy",), "enable_persistence": ("--persist",),
    "tenant_salt": ("--tenant",), "enable_profiling": ("--profile",),
}
NONE_TEXT = "none"
TRUE_TEXTS = ("true", "1", "yes", "on")
FALSE_TEXTS = ("false", "0", "no", "off")
SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
BINARY_UNITS = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def parse_bool(text: str) -> bool:
    word = text.strip().lower()
    if word not in TRUE_TEXTS + FALSE_TEXTS:
        raise ValueError(f"{text!r} is not a boolean; expected one of: {', '.join(TRUE_TEXTS + FALSE_TEXTS)}")
    return word in TRUE_TEXTS


def parse_int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an integer; expected a whole number such as 4096") from None


def parse_float(text: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a number; expected a decimal number such as 0.9") from None


def parse_size(text: str) -> int:
    """Bytes from '1000', '512MiB', '4GiB', '1.5GB': units B, kB, MB, GB, TB (powers of 1000), KiB..TiB (1024)."""
    body = text.strip()
    number = body.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").rstrip()
    unit = SIZE_UNITS.get(body[len(number):].strip().lower())
    try:
        value = Decimal(number) * unit if unit is not None and number[:1].isdigit() else None
    except InvalidOperation:
        value = None
    if value is None or not value.is_finite():
        raise ValueError(f"{text!r} is not a size in bytes; expected a number with an optional unit, such as "
                         f"1000, 512MiB, 4GiB or 1.5GB (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)")
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} is {value} bytes; expected a whole number of bytes")
    return int(value)


def format_size(value: int) -> str:
    """'512MiB' when a binary unit divides `value` exactly, else the number of bytes."""
    return next((f"{value // size}{name}" for name, size in BINARY_UNITS if value and not value % size), str(value))


TIER_PARTS: dict[str, Callable[[str], Any]] = {
    "kind": str, "capacity_bytes": parse_size, "policy": str, "codec": str}


def _tier(number: int, given: Mapping[str, Any]) -> TierConfig:
    """TierConfig from named parts (text parsed by TIER_PARTS); ValueError naming the tier by its number."""
    unknown = sorted(set(given) - set(TIER_PARTS))
    if unknown or "kind" not in given:
        why = f"unknown key(s) {unknown}" if unknown else "no kind"
        raise ValueError(f"tier {number}: {why}; expected the keys {', '.join(TIER_PARTS)} (kind required)")
    try:
        return TierConfig(**{k: TIER_PARTS[k](v) if isinstance(v, str) else v for k, v in given.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"tier {number}: {exc}") from None


def parse_tiers(text: str) -> tuple[TierConfig, ...]:
    """'cpu:512MiB:lru,disk:4GiB:s3fifo:zstd,redis' -> TierConfigs; an empty part keeps its default; '' -> ()."""
    tiers = []
    for number, item in enumerate((i for i in text.split(",") if i.strip()), 1):
        parts = [p.strip() for p in item.split(":")]
        if len(parts) > len(TIER_PARTS):
            raise ValueError(f"tier {number} {item!r} has {len(parts)} parts; expected KIND[:SIZE[:POLICY[:CODEC]]]")
        tiers.append(_tier(number, {name: part for name, part in zip(TIER_PARTS, parts, strict=False) if part}))
    return tuple(tiers)


def format_tiers(tiers: tuple[TierConfig, ...]) -> str:
    """The inverse of `parse_tiers`."""
    parts = ((t.kind.value, format_size(t.capacity_bytes), t.policy or "", getattr(t.codec, "value", "")) for t in tiers)
    return ",".join(":".join(p).rstrip(":") for p in parts)


def tiers_from_tables(tables: Any) -> tuple[TierConfig, ...]:
    """`[[tiers]]` tables of a TOML file (keys kind, capacity_bytes, policy, codec), or TierConfigs, as a tuple."""
    if not isinstance(tables, list | tuple) or not all(isinstance(t, dict | TierConfig) for t in tables):
        raise ValueError(f"{tables!r} is not a list of [[tiers]] tables nor a string such as 'cpu:512MiB,disk'")
    return tuple(t if isinstance(t, TierConfig) else _tier(n, t) for n, t in enumerate(tables, 1))


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class ValueKind:
    """How one type is read and written: `parse` reads text (an option, a variable, a TOML string), `format`
    writes text that `parse` reads back, `from_value` takes any other value (TOML-native or already typed)."""

    name: str
    parse: Callable[[str], Any]
    format: Callable[[Any], str]
    metavar: str
    from_value: Callable[[Any], Any] = _same


VALUE_KINDS: dict[object, ValueKind] = {
    bool: ValueKind("bool", parse_bool, lambda v: TRUE_TEXTS[0] if v else FALSE_TEXTS[0], "BOOL"),
    int: ValueKind("int", parse_int, str, "N"),
    float: ValueKind("float", parse_float, repr, "X"),
    str: ValueKind("str", str, str, "TEXT"),
    tuple[TierConfig, ...]: ValueKind("tiers", parse_tiers, format_tiers, "KIND[:SIZE[:POLICY[:CODEC]]],...",
                                      tiers_from_tables),
}
UNITS: dict[str, ValueKind] = {"bytes": ValueKind("bytes", parse_size, format_size, "SIZE")}


def _enum_kind(cls: type[enum.Enum], field_name: str) -> ValueKind:
    own = getattr(cls, "parse", None)  # CacheStrategy and KVDType have their own (and their own messages)
    parse = (lambda text: own(text.strip())) if own else (lambda text: parse_enum(cls, field_name, text.strip()))
    return ValueKind("enum", parse, lambda v: str(v.value), "|".join(str(m.value) for m in cls))


def _optional(kind: ValueKind) -> ValueKind:
    def parse(text: str) -> Any:
        return None if text.strip().lower() == NONE_TEXT else kind.parse(text)

    def format_(value: Any) -> str:
        return NONE_TEXT if value is None else kind.format(value)

    def from_value(value: Any) -> Any:
        return None if value is None else kind.from_value(value)

    return dataclasses.replace(kind, parse=parse, format=format_, from_value=from_value,
                               metavar=f"{kind.metavar}|{NONE_TEXT}")


def _value_kind(f: dataclasses.Field[Any], hint: Any) -> ValueKind:
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
    unit = f.metadata.get("unit")
    base = next(a for a in args if a is not type(None))
    kind = UNITS.get(unit) if unit else _enum_kind(enums[0], f.name) if enums else VALUE_KINDS.get(base)
    if kind is None:
        raise TypeError(f"KVCacheConfig.{f.name}: no ValueKind for {hint!r} (unit {unit!r}); add one to "
                        "VALUE_KINDS or UNITS in config_sources.py")
    return _optional(kind) if type(None) in args else kind


@dataclass(frozen=True)
class ConfigField:
    """One KVCacheConfig field as the outside world names it; `default` is the dataclass's, normalised."""

    name: str
    option: str
    aliases: tuple[str, ...]
    env: str
    kind: ValueKind
    help: str
    default: Any
    secret: bool = False  # never printed (`uakv config` names its source only)


def field_table() -> tuple[ConfigField, ...]:
    """One ConfigField per KVCacheConfig field, in declaration order."""
    hints, defaults = typing.get_type_hints(KVCacheConfig), KVCacheConfig()
    return tuple(
        ConfigField(name=f.name, option="--" + f.name.replace("_", "-"), aliases=OPTION_ALIASES.get(f.name, ()),
                    env=ENV_PREFIX + f.name.upper(), kind=_value_kind(f, hints[f.name]),
                    help=f.metadata.get("help", ""), default=getattr(defaults, f.name),
                    secret=bool(f.metadata.get("secret", False)))
        for f in dataclasses.fields(KVCacheConfig))


@dataclass(frozen=True)
class ResolvedConfig:
    """A config and, per field, where its value came from: 'default', 'file PATH', 'env NAME' or 'flag OPTION'."""

    config: KVCacheConfig
    sources: dict[str, str]


class _Layers:
    """Values read so far, a later layer overriding an earlier one; each value validated as it is read."""

    def __init__(self, table: tuple[ConfigField, ...]) -> None:
        self.table = {f.name: f for f in table}
        self.values: dict[str, Any] = {}
        self.sources = {f.name: "default" for f in table}

    def read(self, given: Mapping[str, Any], source: Callable[[str], str], where: Callable[[str], str]) -> None:
        """Take `given` (field name -> text or value); `source(name)` is recorded, `where(name)` starts errors."""
        unknown = sorted(set(given) - set(self.table))
        if unknown:
            close = difflib.get_close_matches(unknown[0], list(self.table), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"expected some of: {', '.join(self.table)}"
            raise ValueError(f"{where(unknown[0])}: unknown config field(s) {unknown}; {hint}")
        for name, raw in given.items():
            kind = self.table[name].kind
            try:
                value = kind.parse(raw) if isinstance(raw, str) else kind.from_value(raw)
                self.values[name] = getattr(KVCacheConfig(**{name: value}), name)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"{where(name)}: {exc}") from None
            self.sources[name] = source(name)


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML file's top-level table; ValueError naming the file when it is not TOML."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {os.fspath(path)} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"config file {os.fspath(path)}: not valid TOML: {exc}") from None


def env_values(environ: Mapping[str, str], table: tuple[ConfigField, ...],
               other_env: Collection[str] = ()) -> dict[str, str]:
    """Field name -> text of each field's UAKV_* variable; another UAKV_* name close to one (a typo) raises,
    unless it is in NON_FIELD_ENV or `other_env`."""
    by_env = {f.env: f.name for f in table}
    known = NON_FIELD_ENV | set(other_env)
    lookalikes = {f.env: f.env for f in table} | {
        ENV_PREFIX + a.lstrip("-").replace("-", "_").upper(): f.env for f in table for a in f.aliases}
    for key in sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in by_env and k not in known):
        close = difflib.get_close_matches(key, list(lookalikes), n=1, cutoff=0.85)
        if close:
            raise ValueError(f"environment variable {key}={environ[key]!r} is not a configuration variable; "
                             f"did you mean {lookalikes[close[0]]}? (`uakv config --help` lists them all)")
    return {name: environ[env] for env, name in by_env.items() if env in environ}


def resolve_config(flags: Mapping[str, Any], config_file: str | os.PathLike[str] | None,
                   environ: Mapping[str, str], defaults: Mapping[str, Any] | None = None,
                   other_env: Collection[str] = ()) -> ResolvedConfig:
    """The config from `flags` > `environ` (UAKV_*) > the TOML file > `defaults` > the dataclass's defaults.

    `flags` and `defaults` map field names to text (parsed as a variable's) or to values (validated as given);
    `other_env` names the caller's own UAKV_* variables (not fields, not typos).
    """
    table = field_table()
    layers = _Layers(table)
    layers.read(defaults or {}, lambda name: "default", lambda name: f"default of {name}")
    if config_file is not None:
        path = os.fspath(config_file)
        layers.read(read_file(path), lambda key: f"file {path}", lambda key: f"config file {path}, key {key}")
    env = {f.name: f.env for f in table}
    layers.read(env_values(environ, table, other_env), lambda name: f"env {env[name]}",
                lambda name: f"environment variable {env[name]}")
    option = {f.name: f.option for f in table}
    layers.read(flags, lambda name: f"flag {option[name]}", lambda name: f"option {option.get(name, name)}")
    return ResolvedConfig(KVCacheConfig(**layers.values), layers.sources)


def load_config(args_overrides: Mapping[str, Any], config_file: str | os.PathLike[str] | None,
                environ: Mapping[str, str]) -> KVCacheConfig:
    """KVCacheConfig from CLI flags > environment (UAKV_*) > TOML config file > dataclass defaults."""
    return resolve_config(args_overrides, config_file, environ).config


def toml_string(text: str) -> str:
    """A TOML basic string: backslash and quote escaped, control characters as \\u and four hex digits."""
    body = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if " " <= c != "\x7f" else f"\\u{ord(c):04x}" for c in body) + '"'


def _toml_table(tier: TierConfig) -> str:
    parts = (f"{f.name} = {toml_value(getattr(tier, f.name))}" for f in dataclasses.fields(tier)
             if getattr(tier, f.name) is not None)
    return "{" + ", ".join(parts) + "}"


TOML_RENDER: dict[type, Callable[[Any], str]] = {
    bool: lambda v: "true" if v else "false", int: str, float: repr, str: toml_string,
    type(None): lambda v: toml_string(NONE_TEXT), TierConfig: _toml_table,
    tuple: lambda v: "[" + "".join(f"\n    {toml_value(x)}," for x in v) + ("\n]" if v else "]"),
}


def toml_value(value: Any) -> str:
    """`value` as TOML: enums by value, None as "none" (which every optional field reads back as None)."""
    plain = value.value if isinstance(value, enum.Enum) else value
    return TOML_RENDER[type(plain)](plain)


def to_toml(resolved: ResolvedConfig) -> str:
    """The config as TOML that `resolve_config(..., config_file=...)` reads back to an equal config; each line's
    comment names the value's source (byte sizes also in binary units)."""
    lines = ["# uakv configuration; each comment names the value's source: default, file PATH, env NAME or flag.",
             '# Load it with `uakv COMMAND --config FILE`; "none" means no value (None).']
    for f in field_table():
        value = getattr(resolved.config, f.name)
        if value is not None and f.secret:  # never printed: the line says where it came from
            lines.append(f"# {f.name} = (secret, not shown)  # {resolved.sources[f.name]}")
            continue
        size = f" ({format_size(value)})" if f.kind.name == "bytes" and value and value % 1024 == 0 else ""
        lines.append(f"{f.name} = {toml_value(value)}  # {resolved.sources[f.name]}{size}")
    return "\n".join(lines) + "\n"
