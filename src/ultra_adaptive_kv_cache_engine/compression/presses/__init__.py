"""Token-eviction presses: keep part of a prompt's KV per layer and KV head after its prefill, one registry.

- "sinks_window": StreamingLLM's attention sinks + the most recent tokens (data-free);
- "snapkv": SnapKV's observation-window vote (the last prompt tokens' attention), pooled, top-k per KV head;
- "keys_norm": the lowest key norms per KV head (keys only).
`PressConfig(name, ratio=... | tokens=..., params={...})` names one; `make_press` builds it; `press_namespace`
and `pressed_block_hashes` name the blocks of a pressed sequence; `parse_press` / `format_press` read and write a press
as one line of text (`KVCacheConfig.kv_press`).
"""

from .base import LayerObservation, Press, PressConfig, keep_top
from .keys_norm import KeysNormPress
from .namespace import press_namespace, pressed_block_hashes, prompt_name
from .registry import PRESSES, make_press, press_names, register_press
from .sinks_window import SinksWindowPress
from .snapkv import SnapKVPress
from .spec import format_press, parse_press

__all__ = [
    "PRESSES",
    "KeysNormPress",
    "LayerObservation",
    "Press",
    "PressConfig",
    "SinksWindowPress",
    "SnapKVPress",
    "format_press",
    "keep_top",
    "make_press",
    "parse_press",
    "press_names",
    "press_namespace",
    "pressed_block_hashes",
    "prompt_name",
    "register_press",
]
