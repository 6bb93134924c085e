"""`Sampler`: the next token of every row of a step's logits, each row with its own request's parameters.

Greedy rows (temperature 0) take the argmax (the first maximum, as torch and transformers do). Sampled rows
divide their logits by the temperature, keep the smallest set of most likely tokens whose probability reaches
`top_p` (the nucleus; at least one token), and draw from it with the request's own `torch.Generator`, so a
seeded request draws the same tokens whatever else shares its batch. One host synchronisation per call.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from .sampling import SamplingParams


def request_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The generator a sampled request draws with: seeded by `params.seed`, else from OS entropy; None for
    a greedy request (it draws nothing)."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(params.seed if params.seed is not None else random.SystemRandom().getrandbits(63))
    return generator


class Sampler:
    """Batched sampling (see the module docstring). Stateless: the generators belong to the requests."""

    def sample(
        self, logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None]
    ) -> list[int]:
        """logits (rows, vocab), float32; one `SamplingParams` and generator per row. Returns token ids."""
        if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
            raise ValueError(f"logits {tuple(logits.shape)} for {len(params)} params and {len(generators)} generators")
        tokens = logits.argmax(dim=-1)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
            top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
            probs = _nucleus(torch.softmax(logits[rows].float() / temps[:, None], dim=-1), top_p)
            for k, i in enumerate(sampled):
                generator = generators[i]
                row = probs[k] if generator is None else probs[k].to(generator.device)
                tokens[i] = torch.multinomial(row, 1, generator=generator)[0]
        return tokens.tolist()


def _nucleus(probs: Tensor, top_p: Tensor) -> Tensor:
    """`probs` (rows, vocab) with every token outside its row's top-p nucleus zeroed."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the tokens more likely than this one
    sorted_probs[before >= top_p[:, None]] = 0.0  # the first token always stays (its `before` is 0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
