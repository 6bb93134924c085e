"""`PagedLlama`: a Llama forward of our own whose KV lives in a block-major paged pool.

It takes the weights of a transformers `LlamaForCausalLM` (`from_hf(model)`, or `from_state_dict(state_dict,
config)`; SmolLM2 and other Llama-architecture checkpoints work too) and computes what that model computes:
RMSNorm in float32 cast back to the model dtype, RoPE from the model's own inverse frequencies and attention
scaling, grouped-query attention with scale ``head_dim ** -0.5``, a SiLU-gated MLP. The q/k/v and gate/up
projections are concatenated once (one matmul each instead of three and two); weights stay on the model's
device and dtype.

KV lives in a pool of shape (num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim) (`KVSpec`), or in a
quantized pool and its full-precision staging blocks (`QuantPool`, see `kv_views`: the new tokens are written
into staging blocks, sealed blocks are read through the pool format); every forward writes the new tokens' keys
and values into their slots with the backend's `write_kv`, then attends:
- `prefill`: the new tokens of ONE sequence, positions ``start .. start + T - 1``. Without a cached prefix
  (start == 0) attention is causal SDPA over the new tokens themselves (FlashAttention on CUDA); otherwise
  the backend's paged prefill kernel attends over the cached prefix in the pool and the new tokens, or, when
  few new tokens attend to a long prefix (`GatherRule`, or the caller's `PrefillPath`), SDPA over the
  sequence's blocks gathered per layer (`gathered_prefill`; not for a quantized pool: the kernel path then).
- `forward_packed`: the new tokens of SEVERAL sequences (prefill chunks and single decode tokens alike) packed
  into one forward (`PackedInputs`): one pass over the weights for all of them, the backend's paged prefill
  kernel attending per sequence over its cached prefix and its new tokens (varlen, causal among the new); or,
  given a `WorkingBatch` (the CPU serving path, `working_kv`), attention over the working slab's contiguous
  copies of the sequences' KV, the new KV reaching the pool at the end of the forward.
- `decode`: one token per sequence for a batch, with the backend's paged decode kernel. It reads only the
  tensors of its `DecodeInputs` (slots and lengths are derived on the device), never synchronises with the
  host and allocates only through the caching allocator, so a CUDA graph can capture it (`DecodeStep`). Its
  layers run through `decode_ops` (`kernels.fused_decode_ops`): on CUDA with Triton the RoPE of q and k and the
  KV store are one launch, the SiLU-multiply one, and at batch 1 the products are Triton matrix-vector kernels
  with the norms, the SiLU-multiply and the residual adds fused in; elsewhere the PyTorch formulas (the
  reference twin). A model with biases decodes through the shared layer.

`with_transposed_products()` gives a model whose layer and vocabulary products read transposed weight copies
(faster on a CPU at a few rows, equal within rounding; `transposed_products`).

Invariants: the block table rows cover every position attended (``table[p // block_size]`` holds position
p); positions are below `max_positions` (the RoPE table length; checked on the host in `prefill`, by the
caller for `decode`); with a `QuantPool`, the blocks of the new tokens are staging entries. A forward builds and
validates its paged views once (`PoolViews`), not once per layer. Greedy tokens equal transformers' own on CPU
in float32 (tests).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..kernels import KernelBackend, select_backend
from ..kernels.fused_decode_ops import DecodeOps, get_decode_ops, select_decode_ops
from ..kernels.fused_decode_ops import rms_norm as _rms_norm  # one op: F.rms_norm (float32 statistics)
from ..kernels.fused_decode_ops import rotate as _rotate
from .gathered_prefill import GatherRule, PrefillPath, gathered_attention
from .kv_views import Pool, PoolViews, QuantPool, block_size_of, slot_base
from .transposed_products import TransposedWeights, linear_t, plus_linear_t, transposed
from .working_kv import WorkingBatch

#: RoPE types whose inverse frequencies change with the sequence length (not supported: one fixed table).
_DYNAMIC_ROPE = ("dynamic", "longrope")


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama model (from its transformers config)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act={act!r} is not supported; PagedLlama implements the SiLU-gated MLP")
        heads = int(config.num_attention_heads)
        return cls(
            num_layers=int(config.num_hidden_layers),
            hidden_size=int(config.hidden_size),
            num_heads=heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or config.hidden_size // heads),
            intermediate_size=int(config.intermediate_size),
            vocab_size=int(config.vocab_size),
            rms_norm_eps=float(config.rms_norm_eps),
        )


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer; biases are None when the checkpoint has none."""

    input_norm: Tensor
    qkv: Tensor  # (q_heads + 2 * kv_heads) * head_dim rows
    qkv_bias: Tensor | None
    o: Tensor
    o_bias: Tensor | None
    post_norm: Tensor
    gate_up: Tensor  # 2 * intermediate_size rows: gate, then up
    gate_up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None


@dataclass(frozen=True)
class DecodeInputs:
    """What one decode step reads: the new token and its position per sequence, and the block tables.

    token_ids and positions are (batch,) int64; block_tables is (batch, width) int32, all on the pool's device.
    The token at ``positions[b]`` is appended, so sequence b attends to ``positions[b] + 1`` tokens.
    """

    token_ids: Tensor
    positions: Tensor
    block_tables: Tensor


@dataclass(frozen=True)
class PackedInputs:
    """The new tokens of several sequences, packed (`PagedLlama.forward_packed`); build with `pack`.

    token_ids and positions are (total,) int64; query_start (n + 1,) and seq_lens (n,) int32; block_tables
    (n, width) int32; sequence b owns rows ``query_start[b] .. query_start[b + 1] - 1``, the tokens at
    positions ``seq_lens[b] - q_len_b .. seq_lens[b] - 1``. `max_query_len` and `max_seq_len` are host bounds.
    """

    token_ids: Tensor
    positions: Tensor
    query_start: Tensor
    seq_lens: Tensor
    block_tables: Tensor
    max_query_len: int
    max_seq_len: int

    @classmethod
    def pack(
        cls, chunks: list[tuple[list[int], int, list[int]]], device: torch.device, block_size: int
    ) -> PackedInputs:
        """From (token ids, start position, block table) per sequence; ValueError when a table is too short."""
        width = max(len(table) for _, _, table in chunks)
        tables = torch.zeros((len(chunks), width), dtype=torch.int32)
        ids: list[int] = []
        positions: list[int] = []
        starts, lens = [0], []
        for b, (tokens, start, table) in enumerate(chunks):
            end = start + len(tokens)
            if not tokens or start < 0 or len(table) * block_size < end:
                raise ValueError(f"sequence {b}: {len(tokens)} tokens from {start} with a {len(table)}-block table")
            tables[b, : len(table)] = torch.tensor(table, dtype=torch.int32)
            ids += tokens
            positions += range(start, end)
            starts.append(len(ids))
            lens.append(end)
        return cls(
            token_ids=torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True),
            positions=torch.tensor(positions, dtype=torch.int64).to(device, non_blocking=True),
            query_start=torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
            seq_lens=torch.tensor(lens, dtype=torch.int32).to(device, non_blocking=True),
            block_tables=tables.to(device, non_blocking=True),
            max_query_len=max(len(t) for t, _, _ in chunks),
            max_seq_len=max(lens),
        )


def _cat(parts: list[Tensor | None]) -> Tensor | None:
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) != len(parts):
        raise ValueError("some projections of a fused group have a bias and some do not")
    return torch.cat(present, dim=0)


def _layer_weights(sd: dict[str, Tensor], i: int) -> LayerWeights:
    p = f"model.layers.{i}."
    try:
        attn = [sd[f"{p}self_attn.{n}_proj.weight"] for n in ("q", "k", "v")]
        mlp = [sd[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up")]
        return LayerWeights(
            input_norm=sd[f"{p}input_layernorm.weight"],
            qkv=torch.cat(attn, dim=0),
            qkv_bias=_cat([sd.get(f"{p}self_attn.{n}_proj.bias") for n in ("q", "k", "v")]),
            o=sd[f"{p}self_attn.o_proj.weight"],
            o_bias=sd.get(f"{p}self_attn.o_proj.bias"),
            post_norm=sd[f"{p}post_attention_layernorm.weight"],
            gate_up=torch.cat(mlp, dim=0),
            gate_up_bias=_cat([sd.get(f"{p}mlp.{n}_proj.bias") for n in ("gate", "up")]),
            down=sd[f"{p}mlp.down_proj.weight"],
            down_bias=sd.get(f"{p}mlp.down_proj.bias"),
        )
    except KeyError as exc:
        raise ValueError(f"state dict lacks {exc.args[0]!r}; expected a transformers LlamaForCausalLM's") from None


def _rope_table(inv_freq: Tensor, scaling: float, max_positions: int) -> tuple[Tensor, Tensor]:
    """cos and sin (max_positions, head_dim) in float32, computed as transformers computes them."""
    inv_freq = inv_freq.float()
    positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _plus_linear(h: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """h + x @ weight.T as one matrix product whose epilogue adds the residual (one launch, not two)."""
    if bias is not None:
        return h + F.linear(x, weight, bias)
    return torch.addmm(h, x, weight.t())


def _in_write_caches(slots: Tensor, pool: Pool) -> Tensor:
    """Slots (entry * block_size + offset) as slots of the caches new KV is written into (`kv_views`)."""
    base = slot_base(pool)
    return slots - base if base else slots


class PagedLlama:
    """A Llama forward over a paged KV pool (see the module docstring). Weights are shared, never copied
    except the concatenated projections; the object is immutable after construction."""

    def __init__(
        self, shape: LlamaShape, weights: dict[str, Tensor], inv_freq: Tensor, attention_scaling: float,
        max_positions: int, backend: KernelBackend | None = None, gather_rule: GatherRule | None = None,
    ) -> None:
        if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
            raise ValueError(f"max_positions={max_positions!r} must be a positive int")
        try:
            self.embed = weights["model.embed_tokens.weight"]
            self.norm = weights["model.norm.weight"]
        except KeyError as exc:
            raise ValueError(f"state dict lacks {exc.args[0]!r}; expected a transformers LlamaForCausalLM's") from None
        self.shape = shape
        self.lm_head = weights.get("lm_head.weight", self.embed)  # tied embeddings: the same matrix
        # `with_transposed_products`: the products over transposed copies (None: F.linear over the weights)
        self._transposed: tuple[TransposedWeights, ...] | None = None
        self._lm_head_t: Tensor | None = None
        self.layers = tuple(_layer_weights(weights, i) for i in range(shape.num_layers))
        self.device, self.dtype = self.embed.device, self.embed.dtype
        self.max_positions = max_positions
        cos, sin = _rope_table(inv_freq.to(self.device), float(attention_scaling), max_positions)
        self._cos, self._sin = cos, sin
        self.inv_freq = inv_freq.float().to(self.device)  # RoPE frequencies (head_dim // 2,): a press shifts keys by them
        self.backend = backend if backend is not None else select_backend(self.device)
        self.scale = shape.head_dim**-0.5
        self.gather_rule = gather_rule if gather_rule is not None else GatherRule()
        biased = any(b is not None for w in self.layers for b in (w.qkv_bias, w.o_bias, w.gate_up_bias, w.down_bias))
        # the decode step's fusable ops (kernels.fused_decode_ops); None: a biased model decodes through `_layer`
        self.decode_ops: DecodeOps | None = None if biased else select_decode_ops(self.device, self.backend.write_kv)

    def with_decode_ops(self, name: str) -> PagedLlama:
        """This model (same weights, nothing copied) decoding through the decode ops registered under `name`;
        ValueError for an unknown name or a model with biases (those decode through the shared layer)."""
        if self.decode_ops is None:
            raise ValueError("a model with biases decodes through the shared layer, not through decode ops")
        model = copy.copy(self)
        model.decode_ops = get_decode_ops(name, self.backend.write_kv)
        return model

    def with_transposed_products(self) -> PagedLlama:
        """This model (same weights) computing its layers' and the vocabulary's products over transposed copies
        (`model.transposed_products`: faster on a CPU at a few rows, equal within rounding; the copies cost the
        product weights once more). The fused decode ops (`decode`) keep the weights as they are."""
        model = copy.copy(self)
        model._transposed = tuple(TransposedWeights.of(w) for w in self.layers)
        model._lm_head_t = transposed(self.lm_head)
        return model

    @classmethod
    def from_hf(cls, model: Any, max_positions: int | None = None, backend: KernelBackend | None = None) -> PagedLlama:
        """From a transformers LlamaForCausalLM (its weights are shared, its rotary table is reused)."""
        rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise TypeError(f"{type(model).__name__} has no model.rotary_emb.inv_freq; expected a LlamaForCausalLM")
        if getattr(rotary, "rope_type", "default") in _DYNAMIC_ROPE:
            raise ValueError(f"rope_type={rotary.rope_type!r} is not supported (its frequencies change with length)")
        shape = LlamaShape.from_config(model.config)
        limit = max_positions if max_positions is not None else int(model.config.max_position_embeddings)
        weights = dict(model.state_dict())
        return cls(shape, weights, rotary.inv_freq, float(rotary.attention_scaling), limit, backend)

    @classmethod
    def from_state_dict(
        cls, state_dict: dict[str, Tensor], config: Any, max_positions: int | None = None,
        backend: KernelBackend | None = None,
    ) -> PagedLlama:
        """From a LlamaForCausalLM's state dict and its LlamaConfig (the rotary table is built from the config)."""
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        rotary = LlamaRotaryEmbedding(config)
        if getattr(rotary, "rope_type", "default") in _DYNAMIC_ROPE:
            raise ValueError(f"rope_type={rotary.rope_type!r} is not supported (its frequencies change with length)")
        limit = max_positions if max_positions is not None else int(config.max_position_embeddings)
        return cls(LlamaShape.from_config(config), dict(state_dict), rotary.inv_freq, float(rotary.attention_scaling),
                   limit, backend)

    # -- the shared layer ---------------------------------------------------------------------------------
    def _layer(self, h: Tensor, i: int, views: PoolViews | None, slots: Tensor | None, rope: tuple[Tensor, Tensor],
               attend: Any, store: Any = None) -> Tensor:
        """One decoder layer over h (tokens, hidden): writes the tokens' KV into `slots` of layer i's write
        caches (`PoolViews.write`), or through `store(i, k, v)` when given, then `attend(i, q, k, v)` ->
        (tokens, q_heads, head_dim)."""
        s, w = self.shape, self.layers[i]
        wt = self._transposed[i] if self._transposed is not None else None
        t = h.shape[0]
        x = _rms_norm(h, w.input_norm, s.rms_norm_eps)
        qkv = F.linear(x, w.qkv, w.qkv_bias) if wt is None else linear_t(x, wt.qkv, w.qkv_bias)
        rotated = s.num_heads + s.num_kv_heads  # q and k heads are adjacent: one RoPE for both
        qk = _rotate(qkv[:, : rotated * s.head_dim].view(t, rotated, s.head_dim), *rope)
        q, k = qk[:, : s.num_heads], qk[:, s.num_heads :]
        v = qkv[:, rotated * s.head_dim :].view(t, s.num_kv_heads, s.head_dim)
        if store is not None:
            store(i, k, v)
        else:
            assert views is not None and slots is not None
            self.backend.write_kv(k, v, *views.write(i), slots)
        o = attend(i, q, k, v)
        o = o.reshape(t, s.num_heads * s.head_dim)
        h = _plus_linear(h, o, w.o, w.o_bias) if wt is None else plus_linear_t(h, o, wt.o, w.o_bias)
        x = _rms_norm(h, w.post_norm, s.rms_norm_eps)
        gate_up = F.linear(x, w.gate_up, w.gate_up_bias) if wt is None else linear_t(x, wt.gate_up, w.gate_up_bias)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        return _plus_linear(h, act, w.down, w.down_bias) if wt is None else plus_linear_t(h, act, wt.down, w.down_bias)

    def _decode_layer(self, h: Tensor, i: int, views: PoolViews, slots: Tensor, rope: tuple[Tensor, Tensor]
                      ) -> Tensor:
        """One decoder layer of a decode step through `decode_ops` (a model without biases): as `_layer`, with
        the RoPE and the KV store, the norms, the SiLU-multiply and the residual adds where the ops fuse them."""
        s, w, ops = self.shape, self.layers[i], self.decode_ops
        assert ops is not None
        qkv = ops.norm_linear(h, w.input_norm, s.rms_norm_eps, w.qkv)
        q = ops.rope_write_kv(qkv, *rope, s.num_heads, s.num_kv_heads, *views.write(i), slots)
        o = self.backend.decode_attention(q, views.kv(i), scale=self.scale)
        h = ops.plus_linear(h, o.reshape(h.shape[0], s.num_heads * s.head_dim), w.o)
        gate_up = ops.norm_linear(h, w.post_norm, s.rms_norm_eps, w.gate_up)
        return ops.silu_mul_plus_linear(h, gate_up, w.down)

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self._cos[positions].to(self.dtype), self._sin[positions].to(self.dtype)

    def _logits(self, h: Tensor) -> Tensor:
        x = _rms_norm(h, self.norm, self.shape.rms_norm_eps)
        return (x @ self._lm_head_t if self._lm_head_t is not None else F.linear(x, self.lm_head)).float()

    def check_pool(self, pool: Pool) -> None:
        """ValueError unless `pool` is a block-major pool of this model's KV (shape, dtype, device), or a
        `QuantPool` whose staging blocks are one and whose slabs fit its format."""
        s = self.shape
        if isinstance(pool, QuantPool):
            self.check_pool(pool.staging)
            slab = pool.format.slab_bytes(int(pool.staging.shape[3]), s.num_kv_heads, s.head_dim)
            if (pool.pool.dtype != torch.uint8 or pool.pool.dim() != 4 or tuple(pool.pool.shape[1:]) != (s.num_layers, 2, slab)
                    or pool.pool.device != self.device):
                raise ValueError(f"quantized pool {pool.pool.dtype} {tuple(pool.pool.shape)} on {pool.pool.device} is not "
                                 f"uint8 (blocks, {s.num_layers}, 2, {slab}) on {self.device} ({pool.format.name})")
            return
        if isinstance(pool, Tensor) and pool.dtype == torch.uint8:
            raise ValueError("pool is uint8: a quantized pool is read through a QuantPool (its staging blocks and "
                             "format); only the paged Llama backend serves one")
        if (not isinstance(pool, Tensor) or pool.dim() != 6 or pool.shape[1] != s.num_layers or pool.shape[2] != 2
                or tuple(pool.shape[4:]) != (s.num_kv_heads, s.head_dim)):
            got = tuple(pool.shape) if isinstance(pool, Tensor) else type(pool).__name__
            raise ValueError(f"pool {got} is not (blocks, {s.num_layers}, 2, block_size, {s.num_kv_heads}, {s.head_dim})")
        if pool.dtype != self.dtype or pool.device != self.device:
            raise ValueError(f"pool is {pool.dtype} on {pool.device}; the model is {self.dtype} on {self.device}")

    # -- forwards -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self, pool: Pool, token_ids: Tensor, start: int, block_table: Tensor, path: PrefillPath | None = None
    ) -> Tensor:
        """Runs the T new tokens `token_ids` (T,) of one sequence at positions start .. start + T - 1, whose
        block table (blocks,) covers them; returns the last token's logits (vocab,) in float32. With a cached
        prefix (start > 0), `path` says how to attend (None: `gather_rule` chooses from the sizes; a quantized
        pool always takes the kernel path)."""
        t = int(token_ids.shape[0])
        if t < 1 or start < 0 or start + t > self.max_positions:
            raise ValueError(f"{t} tokens from position {start}: expected >= 1 token below {self.max_positions}")
        if path is not None and not isinstance(path, PrefillPath):
            raise TypeError(f"path must be a PrefillPath or None, got {path!r}")
        bs = block_size_of(pool)
        if block_table.shape[0] * bs < start + t:
            raise ValueError(f"block table of {block_table.shape[0]} blocks cannot hold {start + t} tokens")
        positions = torch.arange(start, start + t, device=self.device)
        table = block_table.to(self.device, torch.int32)
        slots = _in_write_caches(table[positions // bs].long() * bs + positions % bs, pool)
        path = path if path is not None else self.gather_rule.choose(t, start)
        lens = torch.tensor([start + t], dtype=torch.int32).to(self.device, non_blocking=True)
        views = PoolViews(pool, self.backend, table[None], lens, max_seq_len=start + t)
        if start == 0:
            attend = self._causal_attend
        elif path is PrefillPath.GATHERED and isinstance(pool, Tensor):
            attend = gathered_attention(pool, table, start, t, self.scale)
        else:
            attend = self._paged_attend(views, t)
        h = F.embedding(token_ids.to(self.device), self.embed)
        rope = self._rope(positions)
        for i in range(self.shape.num_layers):
            h = self._layer(h, i, views, slots, rope, attend)
        return self._logits(h[-1:])[0]

    def _paged_attend(self, views: PoolViews, t: int) -> Any:
        """The backend's paged prefill kernel over the cached prefix and the t new tokens of one sequence."""
        starts = torch.tensor([0, t], dtype=torch.int32).to(self.device, non_blocking=True)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.backend.prefill_attention(q, starts, views.kv(i), max_query_len=t, scale=self.scale)

        return attend

    def _causal_attend(self, i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal SDPA over the new tokens alone (no cached prefix): (T, heads, dim) in and out."""
        group = self.shape.num_heads // self.shape.num_kv_heads
        k = k.repeat_interleave(group, dim=1) if group > 1 else k
        v = v.repeat_interleave(group, dim=1) if group > 1 else v
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], is_causal=True, scale=self.scale
        )
        return out[0].transpose(0, 1)

    @torch.no_grad()
    def forward_packed(self, pool: Pool, inputs: PackedInputs, all_logits: bool = False,
                       working: WorkingBatch | None = None) -> Tensor:
        """Runs the packed new tokens of several sequences; returns each sequence's last token's logits
        (n, vocab) in float32, or with `all_logits` the logits of every packed token (total, vocab). With
        `working` (built over the same chunks, `WorkingKV.batch`), attention reads the sequences' working
        buffers instead of gathering their blocks, and the new KV reaches the pool at the end."""
        if inputs.max_seq_len > self.max_positions:
            raise ValueError(f"a sequence reaches position {inputs.max_seq_len - 1}; expected below {self.max_positions}")
        if working is not None:
            return self._forward_working(inputs, working, all_logits)
        bs = block_size_of(pool)
        positions, tables = inputs.positions, inputs.block_tables
        q_lens = (inputs.query_start[1:] - inputs.query_start[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(tables.shape[0], device=tables.device), q_lens,
                                       output_size=int(positions.shape[0]))
        slots = _in_write_caches(tables[rows, positions // bs].long() * bs + positions % bs, pool)
        views = PoolViews(pool, self.backend, tables, inputs.seq_lens, max_seq_len=inputs.max_seq_len)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.backend.prefill_attention(q, inputs.query_start, views.kv(i),
                                                  max_query_len=inputs.max_query_len, scale=self.scale)

        h = F.embedding(inputs.token_ids, self.embed)
        rope = self._rope(positions)
        for i in range(self.shape.num_layers):
            h = self._layer(h, i, views, slots, rope, attend)
        return self._logits(h if all_logits else h[inputs.query_start[1:].long() - 1])

    def _forward_working(self, inputs: PackedInputs, working: WorkingBatch, all_logits: bool) -> Tensor:
        """`forward_packed` over working buffers: the same layers, the KV stored into and read from them."""
        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return working.attend(i, q, self.scale)

        h = F.embedding(inputs.token_ids, self.embed)
        rope = self._rope(inputs.positions)
        for i in range(self.shape.num_layers):
            h = self._layer(h, i, None, None, rope, attend, working.store)
        working.flush()
        return self._logits(h if all_logits else h[inputs.query_start[1:].long() - 1])

    @torch.no_grad()
    def decode(self, pool: Pool, inputs: DecodeInputs) -> Tensor:
        """One token per sequence; returns logits (batch, vocab) in float32. Graph-capturable (module docstring)."""
        bs = block_size_of(pool)
        positions = inputs.positions
        tables = inputs.block_tables
        seq_lens = (positions + 1).to(torch.int32)
        entries = tables.gather(1, (positions // bs)[:, None])[:, 0].long()
        slots = _in_write_caches(entries * bs + positions % bs, pool)
        views = PoolViews(pool, self.backend, tables, seq_lens)

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.backend.decode_attention(q, views.kv(i), scale=self.scale)

        h = F.embedding(inputs.token_ids, self.embed)
        rope = self._rope(positions)
        ops = self.decode_ops
        if ops is None:
            for i in range(self.shape.num_layers):
                h = self._layer(h, i, views, slots, rope, attend)
            return self._logits(h)
        for i in range(self.shape.num_layers):
            h = self._decode_layer(h, i, views, slots, rope)
        return ops.norm_linear(h, self.norm, self.shape.rms_norm_eps, self.lm_head).float()
