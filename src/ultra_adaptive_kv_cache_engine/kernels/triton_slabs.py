"""Reading quantized pool slabs inside the Triton attention kernels: codes dequantised in registers.

A slab is one layer's keys (or values) of one block in a `PoolFormat` (see `compression.pool_formats`): the
codes first, (block_size, kv_heads, head_dim // PACK) bytes in C order, then the float16 parameters (per
token and head: scales, and for int4/int2 values mins, each (block_size, kv_heads); per channel for int4/int2
keys: scales then mins, each (kv_heads, head_dim)).

`quant_tile_update` folds one key tile of a quantized `PagedKV` into the online softmax: the tile's block ids
are read once per group of keys sharing a block, its sealed keys go through `slab_attend` and, only when the
tile holds any, its staged keys (table entries >= num_slabs) through `staged_attend`, which reads the
full-precision staging blocks as the unquantized kernel does. `slab_attend`:
- codes become float16 tensor-core operands without conversion instructions where possible: fp8 through the
  hardware's e4m3 -> f16 conversion; int8 / int4 / int2 as float16 bit patterns 0x6400 | code (1024 + code,
  int8 as 1152 + code), the offsets taken out of the products through row sums;
- per-token scales (fp8 / int8 keys, every format's values) are folded out of the element loop: they scale
  the scores and the probabilities, value mins add p @ mins; per-channel key scales and mins (int4 / int2)
  are read once per block and applied per element in float16;
- with WORDS (int8 / int4 / int2 and head_dim // PACK a multiple of 4) codes are read as 32-bit words and a
  word's pairs of codes k and k + G / 2 (G codes per word) are masked into the two halves of one 32-bit
  value, so operand columns follow `column_order` (a permutation within each group of G columns); queries,
  per-channel parameters, staging rows and outputs are read and written in that order, which leaves
  attention unchanged.
Numerics: float16 operands (queries must stay within float16's range; float32 queries and the interpreter use
float32 operands), float32 scores and accumulators. The offsets cost about 2**-14 of the values' scale in the
accumulated products, far below a bfloat16 output's rounding. Parameters are read as float16 through a cast
pointer when their offsets are even (`SlabArgs.aligned`), else byte by byte (odd code sizes only happen in
tiny test shapes).

This module imports triton at import time; import it only through `kernels.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import triton
import triton.language as tl
from torch import Tensor

from .triton_common import mma

if TYPE_CHECKING:
    from .paged_kv import PagedKV

#: Pool format name -> (format code, codes per byte); the kernels' constexpr FMT and PACK.
FORMAT_CODES: dict[str, tuple[int, int]] = {"fp8": (0, 1), "int8": (1, 1), "int4": (2, 2), "int2": (3, 4)}


def format_code(name: str) -> tuple[int, int]:
    """(FMT, PACK) of the pool format `name`; ValueError naming the valid ones."""
    code = FORMAT_CODES.get(name)
    if code is None:
        raise ValueError(f"pool format {name!r} has no Triton kernel; expected one of: {', '.join(FORMAT_CODES)}")
    return code


@dataclass(frozen=True)
class SlabArgs:
    """What an attention launch passes for the slabs of a `PagedKV`: the key and value slab views (stand-ins
    never read when the view is not quantized), their count and the kernels' constexprs."""

    keys: Tensor
    values: Tensor
    num_slabs: int
    quant: bool
    fmt: int
    pack: int
    heads: int
    aligned: bool
    words: bool  # codes read as 32-bit words (int8/int4/int2 with head_dim // PACK a multiple of 4)

    @classmethod
    def of(cls, kv: PagedKV) -> SlabArgs:
        quant = kv.quant
        if quant is None:
            return cls(kv.key_cache, kv.value_cache, 0, False, 0, 1, kv.num_kv_heads, True, False)
        fmt, pack = format_code(quant.format.name)
        keys, values = quant.key_slabs, quant.value_slabs
        even = all(t.stride(0) % 2 == 0 and t.data_ptr() % 2 == 0 for t in (keys, values))
        aligned = even and (kv.block_size * kv.num_kv_heads * (kv.head_dim // pack)) % 2 == 0
        words = fmt > 0 and aligned and (kv.head_dim // pack) % 4 == 0
        return cls(keys, values, quant.num_blocks, True, fmt, pack, kv.num_kv_heads, aligned, words)

    def constexprs(self) -> dict[str, Any]:
        return {"QUANT": self.quant, "FMT": self.fmt, "PACK": self.pack, "HEADS": self.heads, "ALIGNED": self.aligned,
                "WORDS": self.words}


@triton.jit
def load_f16(base, idx, mask, ALIGNED: tl.constexpr):
    """float16 values (as float32) at element `idx` of float16 arrays starting at byte pointers `base`;
    0 where masked. ALIGNED: `base` is even, so a float16 pointer may read them directly."""
    if ALIGNED:
        x = tl.load(base.to(tl.pointer_type(tl.float16)) + idx, mask=mask, other=0.0)
    else:
        lo = tl.load(base + 2 * idx, mask=mask, other=0).to(tl.uint16)
        hi = tl.load(base + 2 * idx + 1, mask=mask, other=0).to(tl.uint16)
        x = (lo | (hi << 8)).to(tl.float16, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def store_f16(base, idx, x, mask, ALIGNED: tl.constexpr):
    """Store float32 `x` rounded to float16 at element `idx` of float16 arrays starting at byte pointers `base`."""
    h = x.to(tl.float16)
    if ALIGNED:
        tl.store(base.to(tl.pointer_type(tl.float16)) + idx, h, mask=mask)
    else:
        bits = h.to(tl.uint16, bitcast=True)
        tl.store(base + 2 * idx, (bits & 0xFF).to(tl.uint8), mask=mask)
        tl.store(base + 2 * idx + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def unpack_codes(raw, PACK: tl.constexpr):
    """Bytes (rows, cols) -> unsigned codes (rows, cols * PACK) in C order: code i of a byte sits in bits
    i * 8 / PACK and up (PACK 2: nibbles, PACK 4: 2-bit codes)."""
    rows: tl.constexpr = raw.shape[0]
    cols: tl.constexpr = raw.shape[1]
    if PACK == 2:
        codes = tl.reshape(tl.join(raw & 0xF, raw >> 4), [rows, cols * 2])
    else:
        even = tl.join(raw & 0x3, (raw >> 4) & 0x3)  # codes 4i and 4i + 2
        odd = tl.join((raw >> 2) & 0x3, raw >> 6)  # codes 4i + 1 and 4i + 3
        codes = tl.reshape(tl.join(even, odd), [rows, cols * 4])
    return codes


@triton.jit
def operand_codes(raw, FMT: tl.constexpr, PACK: tl.constexpr):
    """Bytes (rows, cols) -> float16 dot operands (rows, cols * PACK), exact: fp8 the e4m3 value; int8
    1152 + code, int4/int2 1024 + code (the code's bits under float16 1024's exponent: no conversion
    instruction; the offset is taken out of the dot's result by the caller)."""
    if FMT == 0:
        x = raw.to(tl.float8e4nv, bitcast=True).to(tl.float16)
    else:
        if FMT == 1:
            u = (raw ^ 0x80).to(tl.uint16)
        else:
            u = unpack_codes(raw, PACK).to(tl.uint16)
        x = (u | 0x6400).to(tl.float16, bitcast=True)
    return x


@triton.jit
def _pairs(t):
    """int32 words each holding two float16 bit patterns -> (low halves, high halves) as int16."""
    return t.to(tl.int16), (t >> 16).to(tl.int16)


@triton.jit
def word_codes(w, FMT: tl.constexpr, PACK: tl.constexpr):
    """int32 words (rows, cols) of packed codes -> float16 operands (rows, cols * 4 * PACK) in the word
    order of `column_order`: a word holds G = 4 * PACK codes; its pair k (k < G / 2) is codes k and k + G / 2,
    masked into the two halves of one 32-bit value under float16 1024's exponent (int8: 1152 + code; int4 /
    int2: 1024 + code), so an operand pair is one word of shifted, masked bits, no byte shuffle."""
    rows: tl.constexpr = w.shape[0]
    cols: tl.constexpr = w.shape[1]
    BITS: tl.constexpr = 8 // PACK
    MASK: tl.constexpr = ((1 << BITS) - 1) * 0x10001
    FLIP: tl.constexpr = 0x00800080 if FMT == 1 else 0  # int8: two's complement -> code + 128
    lo0, hi0 = _pairs(((w & MASK) ^ FLIP) | 0x64006400)
    lo1, hi1 = _pairs((((w >> BITS) & MASK) ^ FLIP) | 0x64006400)
    if PACK == 1:
        lo, hi = tl.join(lo0, lo1), tl.join(hi0, hi1)
    else:
        lo2, hi2 = _pairs(((w >> 2 * BITS) & MASK) | 0x64006400)
        lo3, hi3 = _pairs(((w >> 3 * BITS) & MASK) | 0x64006400)
        if PACK == 2:
            lo = tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3))
            hi = tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3))
        else:
            lo4, hi4 = _pairs(((w >> 4 * BITS) & MASK) | 0x64006400)
            lo5, hi5 = _pairs(((w >> 5 * BITS) & MASK) | 0x64006400)
            lo6, hi6 = _pairs(((w >> 6 * BITS) & MASK) | 0x64006400)
            lo7, hi7 = _pairs(((w >> 7 * BITS) & MASK) | 0x64006400)
            lo = tl.join(tl.join(tl.join(lo0, lo4), tl.join(lo2, lo6)), tl.join(tl.join(lo1, lo5), tl.join(lo3, lo7)))
            hi = tl.join(tl.join(tl.join(hi0, hi4), tl.join(hi2, hi6)), tl.join(tl.join(hi1, hi5), tl.join(hi3, hi7)))
    codes = tl.reshape(tl.join(lo, hi), [rows, cols * 4 * PACK])
    return codes.to(tl.float16, bitcast=True)


@triton.jit
def column_order(d, PACK: tl.constexpr, WORDS: tl.constexpr):
    """The head_dim column of operand column d: with WORDS, column 2k + h of each group of G = 4 * PACK is
    code k + h * G / 2 of its word (see `word_codes`), so queries, parameters, staging rows and outputs are
    read and written in that order; the identity otherwise."""
    if WORDS:
        G: tl.constexpr = 4 * PACK
        r = d % G
        col = d - r + r // 2 + (r % 2) * (G // 2)
    else:
        col = d
    return col


@triton.jit
def slab_codes(row, tok, ok3, FMT: tl.constexpr, PACK: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WORDS: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) float16 operands of codes row `tok` (NB, SUB) of slabs starting at `row` (NB,)
    where `ok3`: 32-bit words through `word_codes` when WORDS, else bytes through `operand_codes`."""
    DP: tl.constexpr = HEAD_DIM // PACK
    if WORDS:
        DW: tl.constexpr = DP // 4
        c = tl.arange(0, BLOCK_D // (4 * PACK))
        base = (row[:, None] + tok * DP).to(tl.pointer_type(tl.int32))
        w = tl.load(base[:, :, None] + c[None, None, :], mask=ok3[:, :, None] & (c < DW)[None, None, :], other=0)
        x = word_codes(tl.reshape(w, [BLOCK_N, BLOCK_D // (4 * PACK)]), FMT, PACK)
    else:
        c = tl.arange(0, BLOCK_D // PACK)
        raw = tl.load((row[:, None] + tok * DP)[:, :, None] + c[None, None, :],
                      mask=ok3[:, :, None] & (c < DP)[None, None, :], other=0)
        x = operand_codes(tl.reshape(raw, [BLOCK_N, BLOCK_D // PACK]), FMT, PACK)
    return x


@triton.jit
def to_word_order(x, PACK: tl.constexpr, WORDS: tl.constexpr):
    """Columns of x (rows, cols) in head_dim order -> in operand order (`column_order`), in registers."""
    if WORDS:
        rows: tl.constexpr = x.shape[0]
        cols: tl.constexpr = x.shape[1]
        G: tl.constexpr = 4 * PACK
        y = tl.permute(tl.reshape(x, [rows, cols // G, 2, G // 2]), [0, 1, 3, 2])
        x = tl.reshape(y, [rows, cols])
    return x


@triton.jit
def slab_attend(
    q_op, q_sum, m_i, l_i, acc, ks_ptr, vs_ptr, stride_ks, stride_vs, blk, slot, ok3, allowed,
    kvh, scale_log2,
    FMT: tl.constexpr, PACK: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ALIGNED: tl.constexpr, WORDS: tl.constexpr,
    IEEE_DOT: tl.constexpr,
):
    """Fold one tile's sealed keys into the online softmax (m_i, l_i, acc), reading their slabs directly. The
    tile is NB groups of SUB keys that share a block: `blk` (NB,) their slab ids, `slot` (NB, SUB) their
    offsets in it, `ok3` (NB, SUB) the keys to read; `allowed` (rows, BLOCK_N) also masks scores (causal).
    Scales are folded out of the element loop: per-token key scales multiply the scores, per-token value
    scales the probabilities (value mins add p @ mins), the codes' offsets come out through q_sum (row sums of
    q_op) and the row sums of the probabilities; only per-channel key parameters (int4/int2, read once per
    block) are applied per element. Rows with no allowed key are left unchanged."""
    DATA: tl.constexpr = PAGE * HEADS * (HEAD_DIM // PACK)
    OFFSET: tl.constexpr = 0.0 if FMT == 0 else (1152.0 if FMT == 1 else 1024.0)
    tok = slot * HEADS + kvh  # (NB, SUB): the token's row of codes and index of its per-token parameters
    ok = tl.reshape(ok3, [BLOCK_N])
    krow = ks_ptr + blk.to(tl.int64) * stride_ks
    k = slab_codes(krow, tok, ok3, FMT, PACK, HEAD_DIM, BLOCK_N, BLOCK_D, WORDS).to(q_op.dtype)
    if FMT >= 2:  # per channel: k = code * s + mn, parameters (NB, BLOCK_D) spread over each block's keys
        d = tl.arange(0, BLOCK_D)
        pm = (tl.max(ok3.to(tl.int32), 1) > 0)[:, None] & (d < HEAD_DIM)[None, :]
        chan = kvh * HEAD_DIM + d[None, :]
        SUB: tl.constexpr = ok3.shape[1]
        NB: tl.constexpr = ok3.shape[0]
        s_c = to_word_order(load_f16((krow + DATA)[:, None], chan, pm, ALIGNED).to(q_op.dtype), PACK, WORDS)
        mn_c = load_f16((krow + DATA + 2 * HEADS * HEAD_DIM)[:, None], chan, pm, ALIGNED).to(q_op.dtype)
        mn_c = to_word_order(mn_c, PACK, WORDS)
        s_c = tl.reshape(tl.broadcast_to(s_c[:, None, :], [NB, SUB, BLOCK_D]), [BLOCK_N, BLOCK_D])
        mn_c = tl.reshape(tl.broadcast_to(mn_c[:, None, :], [NB, SUB, BLOCK_D]), [BLOCK_N, BLOCK_D])
        k = (k - 1024.0) * s_c + mn_c
        s = mma(q_op, tl.trans(k), IEEE_DOT)
    else:  # per token: scores * s_t
        k_scale = tl.reshape(load_f16(krow[:, None] + DATA, tok, ok3, ALIGNED), [BLOCK_N])
        s = (mma(q_op, tl.trans(k), IEEE_DOT) - OFFSET * q_sum[:, None]) * k_scale[None, :]
    s = tl.where(allowed & ok[None, :], s * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays at zero
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    vrow = vs_ptr + blk.to(tl.int64) * stride_vs
    v = slab_codes(vrow, tok, ok3, FMT, PACK, HEAD_DIM, BLOCK_N, BLOCK_D, WORDS).to(q_op.dtype)
    v_scale = tl.reshape(load_f16(vrow[:, None] + DATA, tok, ok3, ALIGNED), [BLOCK_N])
    p_op = (p * v_scale[None, :]).to(q_op.dtype)
    fix = -OFFSET * tl.sum(p_op.to(tl.float32), 1)
    if FMT >= 2:
        v_min = tl.reshape(load_f16(vrow[:, None] + DATA + 2 * PAGE * HEADS, tok, ok3, ALIGNED), [BLOCK_N])
        fix += tl.sum(p * v_min[None, :], 1)
    acc = acc * alpha[:, None] + mma(p_op, v, IEEE_DOT) + fix[:, None]
    return m_new, l_i, acc


@triton.jit
def staged_attend(
    q, m_i, l_i, acc, k_ptr, v_ptr, stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh,
    page, slot, staged, allowed, kvh, d, d_ok, scale_log2, IEEE_DOT: tl.constexpr,
):
    """Fold one tile's keys that live in full-precision staging blocks (`staged`; `page` their staging block
    ids) into the online softmax, as the unquantized kernels do; rows with no allowed key are left unchanged."""
    blk = page.to(tl.int64)
    k_off = blk * stride_kn + slot * stride_kt + kvh * stride_kh
    v_off = blk * stride_vn + slot * stride_vt + kvh * stride_vh
    k_t = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=staged[None, :] & d_ok[:, None], other=0.0)
    s = tl.where(allowed & staged[None, :], mma(q, k_t, IEEE_DOT) * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=staged[:, None] & d_ok[None, :], other=0.0)
    acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, IEEE_DOT)
    return m_new, l_i, acc


@triton.jit
def quant_tile_update(
    q, q_op, q_sum, m_i, l_i, acc, ks_ptr, vs_ptr, stride_ks, stride_vs,
    k_ptr, v_ptr, stride_kn, stride_kt, stride_kh, stride_vn, stride_vt, stride_vh,
    bt_row, t0, end, allowed, kvh, d, d_ok, num_slabs, scale_log2,
    FMT: tl.constexpr, PACK: tl.constexpr, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr,
    WORDS: tl.constexpr, IEEE_DOT: tl.constexpr,
):
    """The key tile [t0, t0 + BLOCK_N) of a quantized view (positions from `end` on are not read): its block
    ids read once per group of SUB keys sharing a block (SUB = block size when it divides BLOCK_N, BLOCK_N
    when the block is larger, 1 otherwise), its sealed keys through `slab_attend`, then (only when the tile
    has any) its staged keys through `staged_attend`."""
    NB: tl.constexpr = BLOCK_N // SUB
    first = t0 + tl.arange(0, NB) * SUB  # first position of each group
    page = tl.load(bt_row + first // PAGE, mask=first < end, other=0)
    slot = (first % PAGE)[:, None] + tl.arange(0, SUB)[None, :]  # (NB, SUB)
    t_ok = (first[:, None] + tl.arange(0, SUB)[None, :]) < end
    sealed = page < num_slabs
    m_i, l_i, acc = slab_attend(q_op, q_sum, m_i, l_i, acc, ks_ptr, vs_ptr, stride_ks, stride_vs,
                                tl.where(sealed, page, 0), slot, t_ok & sealed[:, None], allowed, kvh, scale_log2,
                                FMT, PACK, HEADS, HEAD_DIM, PAGE, BLOCK_N, BLOCK_D, ALIGNED, WORDS, IEEE_DOT)
    staged3 = t_ok & (page >= num_slabs)[:, None]
    if tl.max(tl.max(staged3.to(tl.int32), 1), 0) > 0:
        staged = tl.reshape(staged3, [BLOCK_N])
        page_k = tl.reshape(tl.broadcast_to((page - num_slabs)[:, None], [NB, SUB]), [BLOCK_N])
        m_i, l_i, acc = staged_attend(q, m_i, l_i, acc, k_ptr, v_ptr, stride_kn, stride_kt, stride_kh,
                                      stride_vn, stride_vt, stride_vh, tl.where(staged, page_k, 0),
                                      tl.reshape(slot, [BLOCK_N]), staged, allowed, kvh, d, d_ok, scale_log2,
                                      IEEE_DOT)
    return m_i, l_i, acc


def sub_block(block_size: int, block_n: int) -> int:
    """Keys of a tile that share one block id (see `quant_tile_update`)."""
    if block_n % block_size == 0:
        return block_size
    return block_n if block_size % block_n == 0 else 1


@triton.jit
def quant_operands(q, IEEE_DOT: tl.constexpr):
    """The query as the slab dots take it (float16 on tensor cores; float32 for IEEE dots) and its row sums."""
    if IEEE_DOT:
        q_op = q.to(tl.float32)
    else:
        q_op = q.to(tl.float16)
    return q_op, tl.sum(q_op.to(tl.float32), 1)
