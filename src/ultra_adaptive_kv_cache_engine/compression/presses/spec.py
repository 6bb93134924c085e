"""A press as one line of text (`KVCacheConfig.kv_press`, `uakv serve --kv-press`, a request's `kv_press`).

Form: ``NAME:BUDGET[,PARAM=VALUE...]`` or ``none``. BUDGET is ``ratio=R`` or ``tokens=N``, or a bare number:
an integer is a token count, a decimal a ratio (``snapkv:0.5`` keeps half the prompt, ``sinks_window:512`` and
``sinks_window:tokens=512`` keep 512 tokens). Parameters are the press's own (``snapkv:0.25,window=16,
pooling=avg``); values parse as int, then float, else text. `parse_press` checks the name and parameters
against the registry, so a bad line raises ValueError naming it and the valid presses; `format_press` writes
the canonical line back.
"""

from __future__ import annotations

from .base import ParamValue, PressConfig
from .registry import make_press, press_names

_NONE = ("", "none")


def _number(text: str) -> ParamValue:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"kv_press={text!r}: {why}. Expected none or NAME:BUDGET[,PARAM=VALUE...], NAME one of "
                      f"{', '.join(press_names())}, BUDGET a ratio in (0, 1] (0.5 or ratio=0.5) or a token count "
                      f"(512 or tokens=512)")


def parse_press(text: str | None) -> PressConfig | None:
    """The press a line names (None for none or an empty line); ValueError naming a bad line."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError(f"kv_press={text!r} must be a string such as 'snapkv:0.5'")
    line = text.strip()
    if line.lower() in _NONE:
        return None
    name, sep, rest = line.partition(":")
    if not sep or not rest.strip():
        raise _bad(text, "no budget")
    budget: dict[str, ParamValue] = {}
    params: dict[str, ParamValue] = {}
    for i, item in enumerate(part.strip() for part in rest.split(",")):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        bare = _number(item)
        if not eq and i == 0 and not isinstance(bare, str):  # a bare number first: the budget
            key, value = ("tokens" if isinstance(bare, int) else "ratio"), item
        if not key or not value:
            raise _bad(text, f"item {item!r} is not PARAM=VALUE")
        target = budget if key in ("ratio", "tokens") else params
        if key in budget or key in params:
            raise _bad(text, f"{key!r} is given twice")
        target[key] = _number(value)
    if len(budget) != 1:
        raise _bad(text, "give exactly one budget")
    try:
        config = PressConfig(name.strip(), params=params, **budget)  # type: ignore[arg-type]
        make_press(config)
    except (TypeError, ValueError) as exc:
        raise _bad(text, str(exc)) from None
    return config


def format_press(config: PressConfig | None) -> str:
    """The canonical line of `config` ("none" for None); `parse_press(format_press(c)) == c`."""
    if config is None:
        return "none"
    budget = f"ratio={config.ratio!r}" if config.ratio is not None else f"tokens={config.tokens!r}"
    params = "".join(f",{k}={v}" for k, v in config.params)  # type: ignore[misc]
    return f"{config.name}:{budget}{params}"
