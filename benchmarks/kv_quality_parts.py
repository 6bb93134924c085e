"""The pieces of bench_kv_quality: a KV setting over a `KVCacheManager` pool (`KVRunner`), teacher-forced
negative log-likelihood in block-sized chunks through `PagedLlama.forward_packed(all_logits=True)`, greedy
decoding, presses branching off a prefilled prompt (`PressStep`), and the passkey prompt.

A `KVRunner` runs chunks of one sequence at a time over its cache's pool: every token of a chunk attends to the
earlier tokens' KV as the pool holds it and to its own chunk's tokens. Sequences live in scratch blocks of the
cache (`allocate_scratch`): no figure is ever served from another sequence's or another setting's blocks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ultra_adaptive_kv_cache_engine.cache.manager import KVCacheManager
from ultra_adaptive_kv_cache_engine.compression.presses import PressConfig
from ultra_adaptive_kv_cache_engine.engine.press_step import PressStep
from ultra_adaptive_kv_cache_engine.model.paged_llama import PackedInputs, PagedLlama
from ultra_adaptive_kv_cache_engine.model.text import TextCodec

PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def text_windows(ids: Sequence[int], length: int, count: int, seed: int) -> list[list[int]]:
    """`count` non-overlapping windows of `length` tokens of `ids`, at seeded offsets, in text order."""
    slots = len(ids) // length
    if not 1 <= count <= slots:
        raise ValueError(f"{len(ids)} tokens hold {slots} windows of {length}; asked for {count}")
    chosen = sorted(random.Random(seed).sample(range(slots), count))
    return [list(ids[i * length : (i + 1) * length]) for i in chosen]


def spans(start: int, end: int, chunk: int) -> list[tuple[int, int]]:
    """[start, end) cut at the multiples of `chunk` (chunks of one block then fill one block each)."""
    cuts = [start, *range((start // chunk + 1) * chunk, end, chunk), end]
    return [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]


def token_nll(logits: Tensor, targets: Sequence[int]) -> Tensor:
    """Negative log-likelihood (float64) of targets[i] under logits row i: (len(targets),)."""
    logp = torch.log_softmax(logits[: len(targets)].double(), dim=-1)
    return -logp[torch.arange(len(targets)), torch.tensor(list(targets), dtype=torch.long)]


def perplexity(nll: Tensor) -> float:
    return math.exp(float(nll.mean()))


@dataclass
class OpenSequence:
    """A runner's sequence: its block table (scratch blocks) and the number of tokens with KV."""

    table: list[int]
    length: int = 0


class KVRunner:
    """One KV setting: `model` over `cache`'s pool (see the module docstring)."""

    def __init__(self, name: str, model: PagedLlama, cache: KVCacheManager) -> None:
        self.name, self.model, self.cache = name, model, cache
        self.block_size = cache.block_size

    def open(self) -> OpenSequence:
        return OpenSequence([])

    def close(self, seq: OpenSequence) -> None:
        self.cache.free_scratch(seq.table)
        seq.table = []

    def _grow(self, seq: OpenSequence, total: int) -> None:
        missing = -(-total // self.block_size) - len(seq.table)
        if missing > 0:
            seq.table += self.cache.allocate_scratch(missing)

    def forward(self, seq: OpenSequence, tokens: Sequence[int], all_logits: bool = True) -> Tensor:
        """Runs `tokens` after the sequence's KV; every token's logits (float32), or the last one's."""
        self._grow(seq, seq.length + len(tokens))
        inputs = PackedInputs.pack([(list(tokens), seq.length, seq.table)], self.model.device, self.block_size)
        logits = self.model.forward_packed(self.cache.kv, inputs, all_logits=all_logits)
        seq.length += len(tokens)
        return logits

    def press(self, seq: OpenSequence, prompt: Sequence[int], config: PressConfig, inv_freq: Tensor) -> OpenSequence:
        """A new sequence holding the pressed KV of `prompt`, which `seq` holds (left as it is); the kept keys
        are moved to RoPE positions ``0 .. kept - 1`` so the next tokens run at their KV index (`rope_shift`)."""
        blocks = -(-len(prompt) // self.block_size)
        result = PressStep(config, self.model, self.cache, inv_freq).apply(seq.table[:blocks], prompt)
        if result is None:
            raise RuntimeError(f"{config.describe()} kept every token of a {len(prompt)}-token prompt")
        return OpenSequence(list(result.table), result.kept)


class QuantKVRunner(KVRunner):
    """A quantized pool (`KVCacheConfig.kv_dtype`) as the live path holds it: a sequence's sealed blocks are
    slabs of the pool, its unsealed ones (the partial tail, the blocks a chunk fills and the full-precision
    window of its last `residual` tokens, `KVCacheConfig.kv_residual_tokens`) live in full-precision staging
    blocks of this runner, and every block entirely older than the window is sealed (quantized on write with
    the backend's `seal_blocks`) right after the forward that filled it. One sequence's staging at a time:
    staging block j holds the sequence's block ``sealed + j``."""

    def __init__(self, name: str, model: PagedLlama, cache: KVCacheManager, quant_pool: type, fmt: object,
                 max_chunk: int, residual: int = 0) -> None:
        super().__init__(name, model, cache)
        spec, self.format, self.residual = cache.spec, fmt, residual
        blocks = (max_chunk + residual) // self.block_size + 2
        shape = (blocks, spec.num_layers, 2, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.staging = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.pool = quant_pool(cache.kv, self.staging, fmt)
        self.sealed: dict[int, int] = {}  # id(sequence) -> its leading blocks sealed

    def forward(self, seq: OpenSequence, tokens: Sequence[int], all_logits: bool = True) -> Tensor:
        self._grow(seq, seq.length + len(tokens))
        bs = self.block_size
        sealed = self.sealed.get(id(seq), max(seq.length - self.residual, 0) // bs)
        if len(seq.table) - sealed > self.staging.shape[0]:
            raise ValueError(f"{len(tokens)} tokens need more than {self.staging.shape[0]} staging blocks")
        n = self.pool.num_sealed
        table = seq.table[:sealed] + [n + j for j in range(len(seq.table) - sealed)]
        inputs = PackedInputs.pack([(list(tokens), seq.length, table)], self.model.device, bs)
        logits = self.model.forward_packed(self.pool, inputs, all_logits=all_logits)
        seq.length += len(tokens)
        full = max(seq.length - self.residual, 0) // bs - sealed
        if full > 0:
            device = self.staging.device
            self.model.backend.seal_blocks(self.staging, torch.arange(full, device=device), self.cache.kv,
                                           torch.tensor(seq.table[sealed : sealed + full], device=device), self.format)
            rest = len(seq.table) - sealed - full  # the staged blocks left move down to staging block 0
            if rest > 0:
                self.staging[:rest] = self.staging[full : full + rest].clone()
        self.sealed[id(seq)] = sealed + max(full, 0)
        return logits

    def close(self, seq: OpenSequence) -> None:
        self.sealed.pop(id(seq), None)
        super().close(seq)


def teacher_forced(runner: KVRunner, seq: OpenSequence, tokens: Sequence[int], targets: Sequence[int],
                   chunk: int) -> Tensor:
    """Feeds `tokens` after the sequence's KV in chunks cut at the multiples of `chunk` (KV positions); returns
    the NLL (float64) of ``targets[i]`` under the logits of ``tokens[i]`` (len(targets) <= len(tokens))."""
    base = seq.length
    out: list[Tensor] = []
    for a, b in spans(base, base + len(tokens), chunk):
        logits = runner.forward(seq, tokens[a - base : b - base])
        wanted = targets[a - base : b - base]
        if wanted:
            out.append(token_nll(logits, wanted))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def prefill(runner: KVRunner, seq: OpenSequence, ids: Sequence[int], chunk: int) -> Tensor:
    """Runs `ids` after the sequence's KV in chunks cut at multiples of `chunk`; the last token's logits."""
    base, logits = seq.length, None
    for a, b in spans(base, base + len(ids), chunk):
        logits = runner.forward(seq, ids[a - base : b - base], all_logits=False)
    if logits is None:
        raise ValueError("prefill needs at least one token")
    return logits[-1]


def greedy(runner: KVRunner, seq: OpenSequence, logits: Tensor, new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens from `logits` (the last prompt token's), one decode step each (no stop)."""
    tokens: list[int] = []
    while True:
        tokens.append(int(logits.argmax()))
        if len(tokens) == new_tokens:
            return tokens
        logits = runner.forward(seq, tokens[-1:], all_logits=False)[-1]


def agreement(tokens: Sequence[int], reference: Sequence[int]) -> tuple[float, int]:
    """(share of positions holding the reference's token, length of the common prefix)."""
    same = [a == b for a, b in zip(tokens, reference, strict=True)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / len(same), prefix


def passkey_prompt(codec: TextCodec, target_tokens: int, depth: float, key: str) -> list[int]:
    """A chat prompt of about `target_tokens` tokens (at most): filler text with the pass key sentence at
    `depth` (0 = start, 1 = end) of it, then the question."""

    def render(repeats: int) -> list[int]:
        filler = [PASSKEY_FILLER] * repeats
        filler.insert(round(depth * repeats), f"The pass key is {key}. Remember it. {key} is the pass key.")
        text = ("There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
                + " ".join(filler) + "\n\nWhat is the pass key?")
        return codec.chat([{"role": "user", "content": text}])

    low, high = 1, max(2, target_tokens // 8)
    while low < high:  # the most filler repeats whose prompt fits target_tokens
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(render(mid)) <= target_tokens else (low, mid - 1)
    return render(low)
