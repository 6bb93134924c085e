"""Where a pressed sequence's blocks are named: a namespace of their own, and the chain of their names.

The pressed KV of a prompt depends on the WHOLE prompt (every token may change which tokens are kept and the
keys of the kept ones), so a pressed block cannot be named by a prefix of the prompt the way full-precision
blocks are. `press_namespace` derives a namespace from the base one whose `codec` also names the press, its
parameters and its budget (no new `Namespace` field: the digests of every other namespace stay as they are);
`pressed_block_hashes` chains the pressed blocks from the whole prompt's name:

  root    = hash_block(last full block's name of the prompt under `base`, prompt's tail tokens, press namespace)
  block j = hash_block(block j-1's name (root for j = 0), (j, kept), press namespace)

so a pressed block j matches only when the whole prompt, the model identity (the base namespace), the press,
its parameters and budget, and the kept length are all equal. A lookup is all-or-nothing: a pressed chain found
entire stands for ALL the prompt's tokens (cached_tokens = len(prompt)) with `kept` tokens of KV; a partial
chain stands for nothing (the first j pressed blocks are not the KV of any prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from ...prefix import Namespace, hash_block, hash_blocks
from .base import PressConfig
from .registry import make_press


def press_namespace(base: Namespace, config: PressConfig) -> Namespace:
    """`base` with the press, its parameters and its budget appended to `codec` (validated by `make_press`)."""
    make_press(config)
    budget = f"ratio={config.ratio!r}" if config.ratio is not None else f"tokens={config.tokens!r}"
    return Namespace(**{**asdict(base), "codec": f"{base.codec}|press:{config.describe()};{budget}"})


def prompt_name(prompt: Sequence[int], base: Namespace, pressed: Namespace) -> bytes:
    """The name of the whole prompt: its full blocks chained under `base`, then its tail (possibly no tokens)
    hashed under `pressed` (so the root differs from every full-precision block name)."""
    if not prompt:
        raise ValueError("a pressed prompt has at least one token")
    bs = base.block_size
    full = hash_blocks(list(prompt), base, bs)
    return hash_block(full[-1] if full else None, list(prompt[len(full) * bs :]), pressed)


def pressed_block_hashes(prompt: Sequence[int], base: Namespace, config: PressConfig, kept: int) -> list[bytes]:
    """Names of the ``kept // block_size`` full pressed blocks of `prompt` (see the module docstring)."""
    if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= len(prompt):
        raise ValueError(f"kept={kept!r} must be an int in [1, {len(prompt)}] (the prompt length)")
    pressed = press_namespace(base, config)
    parent = prompt_name(prompt, base, pressed)
    names: list[bytes] = []
    for j in range(kept // base.block_size):
        parent = hash_block(parent, (j, kept), pressed)
        names.append(parent)
    return names
