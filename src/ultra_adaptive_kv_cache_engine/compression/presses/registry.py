"""The press registry: name -> press class (a frozen dataclass of its parameters); `make_press` builds the press a
`PressConfig` names, with its parameters checked by name."""

from __future__ import annotations

from dataclasses import fields

from .base import Press, PressConfig
from .keys_norm import KeysNormPress
from .sinks_window import SinksWindowPress
from .snapkv import SnapKVPress

PRESSES: dict[str, type[Press]] = {
    SinksWindowPress.name: SinksWindowPress,
    SnapKVPress.name: SnapKVPress,
    KeysNormPress.name: KeysNormPress,
}


def register_press(cls: type[Press]) -> None:
    """Register a press class under its `name` (re-registering a name replaces it)."""
    if not isinstance(cls, type) or not issubclass(cls, Press) or not getattr(cls, "name", ""):
        raise ValueError(f"{cls!r} must be a Press subclass with a non-empty `name`")
    PRESSES[cls.name] = cls


def press_names() -> list[str]:
    return sorted(PRESSES)


def make_press(config: PressConfig) -> Press:
    """The press `config` names, with its parameters; ValueError naming an unknown press or parameter."""
    if not isinstance(config, PressConfig):
        raise TypeError(f"config must be a PressConfig, got {type(config).__name__}")
    cls = PRESSES.get(config.name)
    if cls is None:
        raise ValueError(f"unknown press {config.name!r}; expected one of: {', '.join(press_names())}")
    valid = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    params = dict(config.params)
    unknown = sorted(set(params) - valid)
    if unknown:
        raise ValueError(f"press {config.name!r} has no parameter {unknown[0]!r}; expected: "
                         f"{', '.join(sorted(valid)) or 'none'}")
    return cls(**params)
