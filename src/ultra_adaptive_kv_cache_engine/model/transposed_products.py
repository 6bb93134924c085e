"""Matrix products over transposed weight copies: the CPU serving path's layer products.

transformers and `PagedLlama` keep a projection as (out_features, in_features) and compute ``x @ W.T``
(`F.linear`). On a CPU, at the few rows of a decode step, the same product over a contiguous (in, out) copy runs
about twice as fast (SmolLM2's shapes, 8 rows, one thread: the four layer products 1.7 -> 0.9 ms, the vocabulary
product 40 -> 20 ms; bench_cpu_step). The results are the same products summed in another order: equal within
float rounding, not bit-equal. `TransposedWeights` holds one layer's copies (they cost the layer's weights once
more); `PagedLlama.with_transposed_products` makes a model that uses them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class TransposedWeights:
    """One layer's product weights as contiguous (in_features, out_features) copies."""

    qkv: Tensor
    o: Tensor
    gate_up: Tensor
    down: Tensor

    @classmethod
    def of(cls, layer: Any) -> TransposedWeights:
        """From a `LayerWeights` (its qkv, o, gate_up and down matrices)."""
        return cls(*(transposed(getattr(layer, name)) for name in ("qkv", "o", "gate_up", "down")))


def transposed(weight: Tensor) -> Tensor:
    """A contiguous (in, out) copy of an (out, in) weight."""
    return weight.t().contiguous()


def linear_t(x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` from the transposed weight."""
    return x @ weight_t if bias is None else torch.addmm(bias, x, weight_t)


def plus_linear_t(h: Tensor, x: Tensor, weight_t: Tensor, bias: Tensor | None) -> Tensor:
    """``h + F.linear(x, weight, bias)`` from the transposed weight (one product whose epilogue adds h)."""
    return torch.addmm(h, x, weight_t) if bias is None else h + torch.addmm(bias, x, weight_t)
