"""Tiled, IO-aware flash attention in Triton, with positions and an external LSE.

Algorithm (FlashAttention-2, Dao 2023; Triton's fused-attention tutorial): each program owns a tile of
BLOCK_M query rows, streams BLOCK_N-key tiles of K and V through on-chip memory and keeps an online
softmax (running max ``m``, running sum ``l``, un-normalised output ``acc``) in float32. The scores stay
unscaled and ``qk_scale = softmax_scale * log2(e)`` is folded into the ``exp2`` argument (one FMA per
score); the running max is in base 2, the stored LSE natural-log. The seqlen x seqlen matrix never exists
in memory.

Positions: query row i is at ``q_offset + i * q_stride`` and key j at ``k_offset + j * k_stride``;
the causal and window masks collapse into one band ``qp - below <= kp <= qp + above``
(``positions.mask_band``). For each tile, ``_band_tiles`` returns the tiles of the other operand that
the band reaches, split into a masked head, an unmasked middle and a masked tail: tiles outside the
band are never visited, and only the boundary tiles pay for the mask.

Backward (FlashAttention-2, section 3.2): ``delta = rowsum(dout * out)`` (``_bwd_preprocess``); one
kernel per KV tile accumulates dK and dV over every query head of its GQA group and every query tile
the band reaches (``_bwd_dkdv``, deterministic: no atomics); one kernel per query tile accumulates dQ
(``_bwd_dq``). P = exp(S - lse) is recomputed with the LSE handed in, which in a ring is the *global*
LSE of all steps, so the local gradients are exact without a merge. Rows with lse = -inf (no visible
key) get P = 0.

Ring steps (``ACCUMULATE``): the forward merges its tile into the float32 (out, lse) of earlier key
blocks in its epilogue (``_store_output``), the backward adds into float32 dq/dk/dv (``_store_grad``).
Streamed tiles (``TMA``): K/V in the forward and dQ, Q/dO in dK/dV come through TMA tensor descriptors
when the launcher finds the inputs TMA-readable (``_tma_ok``), else through pointer loads. Fully visible
calls (``FULL``) run one unmasked loop. Which configs are searched was read off the compiled sm_90a code
(``benchmarks/kernel_static.py``).

Head dims: q/k and v each have their own (``HEAD_DIM_QK``, ``HEAD_DIM_V``, each padded to a power of two in
the tiles), for MLA. Logit softcapping (``SOFTCAP``, Gemma 2): scores become c tanh(s * scale / c); the
kernels compute tanh(s * softcap_in) and fold c into qk_scale, and the backward scales dS by 1 - tanh^2.
Attention sinks need no kernel: they enter the final LSE once (``merge.add_sinks_``).

Packed variable-length sequences and masks (``forward_varlen`` / ``backward_varlen``): the same kernels with
``VARLEN=True`` run every (query rows, key rows, band) pair of a call in one launch per kernel. Each program
owns a tile of one *segment* (rows of q in the forward and dQ, of k in dK/dV) and loops over the segment's
*entries*, the key (query) blocks it meets, each with its own band: a packed sequence is a segment with one
entry, a query range that several mask slices reach is a segment with several (see ``_segment_tables``).

Run the tests under the interpreter on CPU:  TRITON_INTERPRET=1 pytest tests/test_kernels.py
"""

from __future__ import annotations

import bisect
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .positions import Positions

LOG2E = math.log2(math.e)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# --------------------------------------------------------------------------------------------- tuning

# The float32 ("ieee") path is the accurate one, not the fast one: its FMA-based dots compile slowly
# (tens of seconds per config at headdim 256), so it gets one small tile instead of a search.
_IEEE_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2)
# FULL (every tile visible and complete, one loop) needs seqlen_k to be a multiple of every BLOCK_N
FULL_TILE = 128


def _configs(kept):
    """Autotune space for 16-bit inputs: the kept (BLOCK_M, BLOCK_N, num_warps, num_stages), chosen by
    ``python -m benchmarks.kernel_static --space candidates`` (bf16, head dim 128, sm_90a, Triton 3.9 and
    3.6): tensor-core (wgmma) code, no spills in the main loops, no serialised wgmma, within sm_90's shared
    memory."""
    if INTERPRET:  # one config (no timing runs); 32-wide so that test-sized inputs cross tile boundaries
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn, warps, stages in kept]


def _prune_configs(configs, named_args, wide_spills=frozenset(), **kwargs):
    """float32 gets _IEEE_CONFIG; a (padded) head dim of 256 gets tiles of at most 64 rows (shared memory) and
    not the tiles in ``wide_spills``; _TMA_ONLY configs only run with TMA."""
    meta = {**named_args, **kwargs}
    if meta["PRECISION"] == "ieee":
        return [_IEEE_CONFIG]
    wide = max(meta["BLOCK_DQK"], meta["BLOCK_DV"]) >= 256
    limit = 64 if wide else 128

    def runs_here(c):
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
        return (max(tile[:2]) <= limit and (meta["TMA"] or tile not in _TMA_ONLY)
                and not (wide and tile in wide_spills))
    kept = [c for c in configs if runs_here(c)]
    return kept or configs[:1]


# Without TMA these spill inside their main loops (the pointer loads hold more registers)
_TMA_ONLY = {(128, 128, 8, 2)}


_TUNE_KEY = ["seqlen_bucket", "BLOCK_DQK", "BLOCK_DV", "PRECISION", "VARLEN", "ACCUMULATE", "TMA", "SOFTCAP"]
_FWD_TUNE_KEY = _TUNE_KEY + ["FULL"]
_PRUNE = {"early_config_prune": _prune_configs}
# dK/dV with a (padded) q/k head dim of 256 (MLA's 192, or 256): 64 x 64 tiles with 3 stages spill in the main loop
# (fp16 192/128 with softcap: 139 local-memory instructions; benchmarks/kernel_static.py)
_PRUNE_DKDV = {"early_config_prune": functools.partial(_prune_configs, wide_spills={(64, 64, 8, 3)})}
# Positions and lengths change from ring step to ring step: do not compile a variant per value class.
_NO_SPECIALIZE = ["seqlen_q", "seqlen_k", "q_offset", "k_offset", "below", "above", "seqlen_bucket"]


def _seqlen_bucket(n):
    """Autotune once per power-of-two length bucket, not once per distinct length."""
    return triton.next_power_of_2(max(n, 16))


# ---------------------------------------------------------------------------------------- jit helpers

@triton.jit
def _first_index_from(pos, offset, stride):
    """Smallest index i >= 0 with ``offset + i * stride >= pos``. Only non-negative numbers are divided,
    so GPU (truncating) and interpreter (flooring) integer division agree."""
    return (tl.maximum(pos - offset, 0) + stride - 1) // stride


@triton.jit
def _count_indices_through(pos, offset, stride):
    """Number of indices i >= 0 with ``offset + i * stride <= pos``."""
    return (tl.maximum(pos - offset, -1) + stride) // stride


@triton.jit
def _band_tiles(a_first, a_last, b_offset, b_stride, b_len, below, above, BLOCK: tl.constexpr):
    """Tiles of block b (BLOCK rows each) that positions [a_first, a_last] see through the band
    ``a - below <= b <= a + above``. Returns (start, full_start, full_end, end): tiles in
    [start, full_start) and [full_end, end) need the mask, tiles in [full_start, full_end) do not."""
    lo = _first_index_from(a_first - below, b_offset, b_stride)
    hi = tl.maximum(tl.minimum(_count_indices_through(a_last + above, b_offset, b_stride), b_len), lo)
    start = (lo // BLOCK) * BLOCK
    end_tile = (hi + BLOCK - 1) // BLOCK * BLOCK
    # a tile is fully visible when its first key is visible from the last query and its last key
    # from the first query, and it lies inside the block
    full_lo = _first_index_from(a_last - below, b_offset, b_stride)
    full_hi = tl.minimum(_count_indices_through(a_first + above, b_offset, b_stride), b_len)
    full_start = tl.minimum(tl.maximum((full_lo + BLOCK - 1) // BLOCK * BLOCK, start), end_tile)
    full_end = tl.minimum(tl.maximum(full_hi // BLOCK * BLOCK, full_start), end_tile)
    return start, full_start, full_end, hi


@triton.jit
def _load_tile(Head, rows, stride_row, stride_d, n_rows, CHECK_ROWS: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Loads rows ``rows`` (x BLOCK_D columns) of one head, masking only what can be out of bounds:
    rows past ``n_rows`` when CHECK_ROWS, columns past HEAD_DIM when the head dim was padded."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = Head + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        if HEAD_DIM != BLOCK_D:
            return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    if HEAD_DIM != BLOCK_D:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _stream_source(Head, n_rows, stride_row, TMA: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    """What a loop streams tiles of one head from: a TMA tensor descriptor over its (n_rows, HEAD_DIM)
    rows when TMA (the launcher checked unit last stride and 16-byte alignment), else the head pointer."""
    if TMA:  # one return statement: the compiler checks every return of a function against the others
        source = tl.make_tensor_descriptor(Head, shape=[n_rows, HEAD_DIM], strides=[stride_row, 1],
                                           block_shape=[BLOCK, BLOCK_D])
    else:
        source = Head
    return source


@triton.jit
def _stream_tile(Source, row0, stride_row, stride_d, n_rows, MASKED: tl.constexpr, TMA: tl.constexpr,
                 HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows ``row0 .. row0 + BLOCK`` of a ``_stream_source``. TMA reads rows and columns out of bounds as
    0, as the masked pointer load does."""
    if TMA:
        tile = Source.load([row0, 0])
    else:
        tile = _load_tile(Source, row0 + tl.arange(0, BLOCK), stride_row, stride_d, n_rows, MASKED, HEAD_DIM, BLOCK_D)
    return tile


@triton.jit
def _store_tile(Head, rows, stride_row, stride_d, n_rows, value, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Stores ``value`` (rows x BLOCK_D) into rows ``rows`` of one head, in the pointer's dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = Head + rows[:, None].to(tl.int64) * stride_row + offs_d[None, :] * stride_d
    tl.store(ptrs, value.to(Head.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation. "emulate-bf16": Triton's interpreter multiplies bfloat16 bit
    patterns as integers, so on CPU the operands are upcast first; bf16 products are exact in fp32,
    which is what a tensor core computes too."""
    if PRECISION == "emulate-bf16":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _to_operand(x, dtype: tl.constexpr, PRECISION: tl.constexpr):
    """x.to(dtype) before a dot. Under "emulate-bf16" the float32 -> bfloat16 rounding is done on the
    bits (to nearest even, as a GPU does): Triton's interpreter truncates instead."""
    if PRECISION == "emulate-bf16":
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


# Packed sequences and masks (VARLEN): one launch covers every pair of the call. Two int32 tables of 5 columns,
# built by ``_segment_tables``: row p of ``Table`` is segment p, (own_start, own_len, own_offset, first, count),
# the rows the program owns (q in the forward and dQ, k in dK/dV) and where its entries are; rows ``first ..
# first + count`` of ``Entries`` are (other_start, other_len, other_offset, below, above), the blocks of the other
# operand it meets and the band of each (always in query terms: qp - below <= kp <= qp + above). Programs of grid
# axis 1 take segment ``program_id(1) // nheads`` (``// nheads_kv`` in _bwd_dkdv) where a batched call takes the
# batch; the packed tensors are passed as one batch with batch stride 0, so that index moves no pointer. Grid
# axis 0 covers the longest segment; programs past the end of a shorter one visit no entry, and their masked
# stores write nothing.


@triton.jit
def _load_row(Table, row):
    """Row ``row`` of a 5-column int32 table (a segment or an entry, see above)."""
    base = Table + row * 5
    return tl.load(base), tl.load(base + 1), tl.load(base + 2), tl.load(base + 3), tl.load(base + 4)


@triton.jit
def _delta_row(Delta, batch, head, nheads, seqlen_q, stride_lb, stride_lh, VARLEN: tl.constexpr):
    """Start of delta's row for (batch, head). delta is (batch, nheads, seqlen_q), contiguous; for packed
    sequences it is laid out like the (contiguous) LSE and already shifted to the pair's first row."""
    if VARLEN:
        return Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
    return Delta + (batch * nheads + head).to(tl.int64) * seqlen_q


@triton.jit
def _tanh(x):
    """tanh from one exp2 (Triton's interpreter has no libdevice tanh): sign(x) (1 - e) / (1 + e) with
    e = exp(-2|x|) <= 1, so nothing overflows; absolute error about 1e-7."""
    e = tl.math.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _capped(scores, softcap_in, SOFTCAP: tl.constexpr):
    """Softcap (Gemma 2): c tanh(s scale / c). The kernels return tanh(s * softcap_in), softcap_in = scale / c,
    and the launcher folds c into qk_scale (c log2(e)) as it folds the softmax scale otherwise."""
    if SOFTCAP:
        scores = _tanh(scores * softcap_in)
    return scores


@triton.jit
def _band_mask(q_pos, k_pos, below, above):
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff <= below) & (diff >= -above)


# -------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_tile(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
              q_pos, n0, seqlen_k, k_offset, k_stride, below, above, qk_scale, softcap_in,
              HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
              SOFTCAP: tl.constexpr):
    """One key tile of the online softmax. ``row_max`` is kept in base-2 units (scores x qk_scale); the
    scores stay unscaled and qk_scale > 0 (check_scale) is folded into the exp2 argument: one FMA per
    score instead of a multiply and a subtract."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    k = _stream_tile(K_src, n0, stride_kn, stride_kd, seqlen_k, MASKED, TMA, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
    scores = _capped(_dot(q, tl.trans(k), PRECISION), softcap_in, SOFTCAP)  # (BLOCK_M, BLOCK_N), unscaled
    if MASKED:
        visible = _band_mask(q_pos, k_offset + offs_n * k_stride, below, above) & (offs_n[None, :] < seqlen_k)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
    else:
        new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
        safe_max = new_max
    probs = tl.math.exp2(scores * qk_scale - safe_max[:, None])
    rescale = tl.math.exp2(row_max - safe_max)
    row_sum = row_sum * rescale + tl.sum(probs, 1)
    v = _stream_tile(V_src, n0, stride_vn, stride_vd, seqlen_k, MASKED, TMA, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
    acc = acc * rescale[:, None] + _dot(_to_operand(probs, v.dtype, PRECISION), v, PRECISION)
    return acc, new_max, row_sum


@triton.jit
def _fwd_inner(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
               q_pos, n_start, n_end, seqlen_k, k_offset, k_stride, below, above, qk_scale, softcap_in,
               HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
               SOFTCAP: tl.constexpr):
    for n0 in range(n_start, n_end, BLOCK_N):
        acc, row_max, row_sum = _fwd_tile(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn,
                                          stride_vd, q_pos, n0, seqlen_k, k_offset, k_stride, below, above,
                                          qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N,
                                          MASKED, PRECISION, TMA, SOFTCAP)
    return acc, row_max, row_sum


@triton.jit
def _fwd_band(acc, row_max, row_sum, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
              q_first, q_last, q_pos, seqlen_k, k_offset, k_stride, below, above, qk_scale, softcap_in,
              HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    """Every key tile of one key block that the band reaches: masked head, unmasked middle, masked tail
    (``_band_tiles``)."""
    start, full_start, full_end, end = _band_tiles(q_first, q_last, k_offset, k_stride, seqlen_k,
                                                   below, above, BLOCK_N)
    K_src = _stream_source(K_head, seqlen_k, stride_kn, TMA, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
    V_src = _stream_source(V_head, seqlen_k, stride_vn, TMA, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
    acc, row_max, row_sum = _fwd_inner(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn,
                                       stride_vd, q_pos, start, full_start, seqlen_k, k_offset, k_stride, below,
                                       above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV,
                                       BLOCK_N, True, PRECISION, TMA, SOFTCAP)
    acc, row_max, row_sum = _fwd_inner(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn,
                                       stride_vd, q_pos, full_start, full_end, seqlen_k, k_offset, k_stride,
                                       below, above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V,
                                       BLOCK_DV, BLOCK_N, False, PRECISION, TMA, SOFTCAP)
    acc, row_max, row_sum = _fwd_inner(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn,
                                       stride_vd, q_pos, full_end, end, seqlen_k, k_offset, k_stride, below,
                                       above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV,
                                       BLOCK_N, True, PRECISION, TMA, SOFTCAP)
    return acc, row_max, row_sum


@triton.jit
def _fwd_full(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd, seqlen_k,
              qk_scale, softcap_in, HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
              SOFTCAP: tl.constexpr):
    """Every key tile, none masked (``FULL``): one loop, no band arithmetic."""
    for n0 in range(0, seqlen_k, BLOCK_N):
        acc, row_max, row_sum = _fwd_tile(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd,
                                          stride_vn, stride_vd, None, n0, seqlen_k, 0, 1, 0, 0, qk_scale, softcap_in,
                                          HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False, PRECISION,
                                          TMA, SOFTCAP)
    return acc, row_max, row_sum


@triton.jit
def _store_output(Out_head, Lse_row, offs_m, stride_om, stride_od, stride_lm, seqlen_q, acc, row_max, row_sum,
                  ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Writes the tile's normalised output and natural-log LSE; rows with no visible key get 0 and -inf.
    ACCUMULATE: Out and Lse hold the float32 (out, lse) of earlier key blocks, and the tile is merged into
    them in place with the online-softmax rule (``dist_attn.kernels.merge``), in base 2:
    lse' = log2(2^lse + 2^lse_tile), out' = out * 2^(lse - lse') + acc * 2^(row_max - lse')."""
    in_rows = offs_m < seqlen_q
    empty = row_sum == 0.0
    lse2 = tl.where(empty, float("-inf"), row_max + tl.math.log2(tl.where(empty, 1.0, row_sum)))
    if ACCUMULATE:
        old_lse2 = tl.load(Lse_row + offs_m * stride_lm, mask=in_rows, other=float("-inf")) * 1.4426950408889634
        top = tl.maximum(old_lse2, lse2)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.math.exp2(old_lse2 - safe_top) + tl.math.exp2(lse2 - safe_top)
        new_lse2 = tl.where(total == 0.0, float("-inf"), safe_top + tl.math.log2(tl.where(total == 0.0, 1.0, total)))
        safe_new = tl.where(total == 0.0, 0.0, new_lse2)
        old_out = _load_tile(Out_head, offs_m, stride_om, stride_od, seqlen_q, True, HEAD_DIM, BLOCK_D)
        out = (old_out * tl.math.exp2(old_lse2 - safe_new)[:, None]
               + acc * tl.math.exp2(row_max - safe_new)[:, None])  # row_max = -inf where empty
        lse2 = new_lse2
    else:
        out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    _store_tile(Out_head, offs_m, stride_om, stride_od, seqlen_q, out, HEAD_DIM, BLOCK_D)
    tl.store(Lse_row + offs_m * stride_lm, lse2 / 1.4426950408889634, mask=in_rows)


@triton.autotune(configs=_configs([(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2)]),
                 key=_FWD_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, Out, Lse, Table, Entries,
                stride_qb, stride_qm, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd,
                stride_ob, stride_om, stride_oh, stride_od,
                stride_lb, stride_lh, stride_lm,
                seqlen_q, seqlen_k, nheads, group,
                q_offset, q_stride, k_offset, k_stride, below, above, qk_scale, softcap_in, seqlen_bucket,
                HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                PRECISION: tl.constexpr, VARLEN: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr,
                SOFTCAP: tl.constexpr, FULL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // nheads
    head = tl.program_id(1) % nheads
    kv_head = head // group
    m0 = pid_m * BLOCK_M
    if VARLEN:  # batch is the segment (see _load_row): its query rows and entries
        q_start, seqlen_q, q_offset, first, count = _load_row(Table, batch)
        Q += q_start.to(tl.int64) * stride_qm
        Out += q_start.to(tl.int64) * stride_om
        Lse += q_start.to(tl.int64) * stride_lm
    offs_m = m0 + tl.arange(0, BLOCK_M)
    Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q = _load_tile(Q_head, offs_m, stride_qm, stride_qd, seqlen_q, True, HEAD_DIM_QK, BLOCK_DQK)

    q_first = q_offset + m0 * q_stride
    q_last = q_offset + (tl.minimum(m0 + BLOCK_M, seqlen_q) - 1) * q_stride
    q_pos = q_offset + offs_m * q_stride
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if FULL:  # every (query, key) pair visible and seqlen_k a multiple of BLOCK_N: no mask, one loop
        K_src = _stream_source(K_head, seqlen_k, stride_kn, TMA, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
        V_src = _stream_source(V_head, seqlen_k, stride_vn, TMA, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
        acc, row_max, row_sum = _fwd_full(acc, row_max, row_sum, q, K_src, V_src, stride_kn, stride_kd, stride_vn,
                                          stride_vd, seqlen_k, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK,
                                          HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, TMA, SOFTCAP)
    elif VARLEN:  # every key block of the segment's entries, each with its band (none past the segment's end)
        for entry in range(first, first + tl.where(m0 < seqlen_q, count, 0)):
            k_start, k_len, k_off, e_below, e_above = _load_row(Entries, entry)
            acc, row_max, row_sum = _fwd_band(acc, row_max, row_sum, q, K_head + k_start.to(tl.int64) * stride_kn,
                                              V_head + k_start.to(tl.int64) * stride_vn, stride_kn, stride_kd,
                                              stride_vn, stride_vd, q_first, q_last, q_pos, k_len, k_off, k_stride,
                                              e_below, e_above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK,
                                              HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, TMA, SOFTCAP)
    else:
        acc, row_max, row_sum = _fwd_band(acc, row_max, row_sum, q, K_head, V_head, stride_kn, stride_kd, stride_vn,
                                          stride_vd, q_first, q_last, q_pos, seqlen_k, k_offset, k_stride, below,
                                          above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV,
                                          BLOCK_N, PRECISION, TMA, SOFTCAP)
    _store_output(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh,
                  Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh, offs_m, stride_om, stride_od,
                  stride_lm, seqlen_q, acc, row_max, row_sum, ACCUMULATE, HEAD_DIM_V, BLOCK_DV)


# ------------------------------------------------------------------------------------------- backward

@triton.jit
def _bwd_preprocess(Out, DOut, Delta,
                    stride_ob, stride_om, stride_oh, stride_od,
                    stride_db, stride_dm, stride_dh, stride_dd,
                    seqlen_q, nheads,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, i] = sum_d dout[b, i, h, d] * out[b, i, h, d], in float32."""
    batch = tl.program_id(1) // nheads
    head = tl.program_id(1) % nheads
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    out = _load_tile(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh, offs_m, stride_om,
                     stride_od, seqlen_q, True, HEAD_DIM, BLOCK_D)
    dout = _load_tile(DOut + batch.to(tl.int64) * stride_db + head.to(tl.int64) * stride_dh, offs_m, stride_dm,
                      stride_dd, seqlen_q, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(out.to(tl.float32) * dout.to(tl.float32), 1)
    tl.store(Delta + (batch * nheads + head).to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_lse_base2(Lse_row, offs_m, stride_lm, seqlen_q, CHECK: tl.constexpr):
    """LSE in base 2, with -inf (row saw no key) turned into +inf so that P = exp2(S - lse) = 0."""
    if CHECK:
        lse = tl.load(Lse_row + offs_m * stride_lm, mask=offs_m < seqlen_q, other=0.0)
    else:
        lse = tl.load(Lse_row + offs_m * stride_lm)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_src, DO_src, Lse_row, Delta_row,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
                    k_pos, m_start, m_end, seqlen_q, q_offset, q_stride, below, above, qk_scale, softcap_in,
                    HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
                    TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _stream_tile(Q_src, m0, stride_qm, stride_qd, seqlen_q, MASKED, TMA, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK)
        dout = _stream_tile(DO_src, m0, stride_dom, stride_dod, seqlen_q, MASKED, TMA, HEAD_DIM_V, BLOCK_M,
                            BLOCK_DV)
        lse = _load_lse_base2(Lse_row, offs_m, stride_lm, seqlen_q, MASKED)
        if MASKED:
            delta = tl.load(Delta_row + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            delta = tl.load(Delta_row + offs_m)
        scores_t = _capped(_dot(k, tl.trans(q), PRECISION), softcap_in, SOFTCAP)  # (BLOCK_N, BLOCK_M), unscaled
        probs_t = tl.math.exp2(scores_t * qk_scale - lse[None, :])
        if MASKED:
            # (keys x queries): kp - above <= qp <= kp + below is the band seen from the keys
            visible_t = _band_mask(k_pos, q_offset + offs_m * q_stride, above, below) & (offs_m[None, :] < seqlen_q)
            probs_t = tl.where(visible_t, probs_t, 0.0)
        dv += _dot(_to_operand(probs_t, dout.dtype, PRECISION), dout, PRECISION)
        dprobs_t = _dot(v, tl.trans(dout), PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        if SOFTCAP:  # through the tanh: its slope 1 - tanh^2
            dscores_t = dscores_t * (1.0 - scores_t * scores_t)
        dk += _dot(_to_operand(dscores_t, q.dtype, PRECISION), q, PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_band(dk, dv, k, v, Q, DO, Lse, Delta, batch, kv_head, group, nheads,
                   stride_qb, stride_qm, stride_qh, stride_qd, stride_dob, stride_dom, stride_doh, stride_dod,
                   stride_lb, stride_lh, stride_lm, k_first, k_last, k_pos, seqlen_q, q_offset, q_stride, below, above,
                   qk_scale, softcap_in, HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
                   TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    """dK, dV of a key tile from one query block (``seqlen_q`` rows from Q), summed over every query head of the
    GQA group (deterministic: no atomics), over the query tiles the band reaches."""
    # Seen from the keys, query qp is visible iff kp - above <= qp <= kp + below: the band mirrored.
    start, full_start, full_end, end = _band_tiles(k_first, k_last, q_offset, q_stride, seqlen_q,
                                                   above, below, BLOCK_M)
    for g in range(0, group):
        head = kv_head * group + g
        Q_src = _stream_source(Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh, seqlen_q,
                               stride_qm, TMA, HEAD_DIM_QK, BLOCK_M, BLOCK_DQK)
        DO_src = _stream_source(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh, seqlen_q,
                                stride_dom, TMA, HEAD_DIM_V, BLOCK_M, BLOCK_DV)
        Lse_row = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
        Delta_row = _delta_row(Delta, batch, head, nheads, seqlen_q, stride_lb, stride_lh, VARLEN)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_src, DO_src, Lse_row, Delta_row, stride_qm, stride_qd,
                                 stride_dom, stride_dod, stride_lm, k_pos, start, full_start, seqlen_q, q_offset,
                                 q_stride, below, above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V,
                                 BLOCK_DV, BLOCK_M, True, PRECISION, TMA, SOFTCAP)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_src, DO_src, Lse_row, Delta_row, stride_qm, stride_qd,
                                 stride_dom, stride_dod, stride_lm, k_pos, full_start, full_end, seqlen_q, q_offset,
                                 q_stride, below, above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V,
                                 BLOCK_DV, BLOCK_M, False, PRECISION, TMA, SOFTCAP)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_src, DO_src, Lse_row, Delta_row, stride_qm, stride_qd,
                                 stride_dom, stride_dod, stride_lm, k_pos, full_end, end, seqlen_q, q_offset,
                                 q_stride, below, above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V,
                                 BLOCK_DV, BLOCK_M, True, PRECISION, TMA, SOFTCAP)
    return dk, dv


@triton.jit
def _store_grad(Head, rows, stride_row, stride_d, n_rows, grad, ACCUMULATE: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Stores a float32 gradient tile, or with ACCUMULATE adds it to the float32 gradient already there."""
    if ACCUMULATE:
        grad = _load_tile(Head, rows, stride_row, stride_d, n_rows, True, HEAD_DIM, BLOCK_D) + grad
    _store_tile(Head, rows, stride_row, stride_d, n_rows, grad, HEAD_DIM, BLOCK_D)


@triton.autotune(configs=_configs([(32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3)]),
                 key=_TUNE_KEY, prune_configs_by=_PRUNE_DKDV)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, Table, Entries,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_dob, stride_dom, stride_doh, stride_dod,
              stride_lb, stride_lh, stride_lm,
              stride_dkb, stride_dkn, stride_dkh, stride_dkd,
              stride_dvb, stride_dvn, stride_dvh, stride_dvd,
              seqlen_q, seqlen_k, nheads, group,
              q_offset, q_stride, k_offset, k_stride, below, above, qk_scale, softcap_in, softmax_scale,
              seqlen_bucket, HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
              BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr, ACCUMULATE: tl.constexpr,
              TMA: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    nheads_kv = nheads // group
    batch = tl.program_id(1) // nheads_kv
    kv_head = tl.program_id(1) % nheads_kv
    n0 = tl.program_id(0) * BLOCK_N
    if VARLEN:  # batch is the segment (see _load_row): its key rows and entries (query blocks)
        k_start, seqlen_k, k_offset, first, count = _load_row(Table, batch)
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
        DK += k_start.to(tl.int64) * stride_dkn
        DV += k_start.to(tl.int64) * stride_dvn
    offs_n = n0 + tl.arange(0, BLOCK_N)
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    k = _load_tile(K_head, offs_n, stride_kn, stride_kd, seqlen_k, True, HEAD_DIM_QK, BLOCK_DQK)
    v = _load_tile(V_head, offs_n, stride_vn, stride_vd, seqlen_k, True, HEAD_DIM_V, BLOCK_DV)

    k_first = k_offset + n0 * k_stride
    k_last = k_offset + (tl.minimum(n0 + BLOCK_N, seqlen_k) - 1) * k_stride
    k_pos = k_offset + offs_n * k_stride
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if VARLEN:  # every query block of the segment's entries (none past the segment's end)
        for entry in range(first, first + tl.where(n0 < seqlen_k, count, 0)):
            q_start, q_len, q_off, e_below, e_above = _load_row(Entries, entry)
            rows = q_start.to(tl.int64)
            dk, dv = _bwd_dkdv_band(dk, dv, k, v, Q + rows * stride_qm, DO + rows * stride_dom, Lse + rows * stride_lm,
                                    Delta + rows * stride_lm, batch, kv_head, group, nheads, stride_qb, stride_qm,
                                    stride_qh, stride_qd, stride_dob, stride_dom, stride_doh, stride_dod, stride_lb,
                                    stride_lh, stride_lm, k_first, k_last, k_pos, q_len, q_off, q_stride, e_below,
                                    e_above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV,
                                    BLOCK_M, PRECISION, VARLEN, TMA, SOFTCAP)
    else:
        dk, dv = _bwd_dkdv_band(dk, dv, k, v, Q, DO, Lse, Delta, batch, kv_head, group, nheads, stride_qb, stride_qm,
                                stride_qh, stride_qd, stride_dob, stride_dom, stride_doh, stride_dod, stride_lb,
                                stride_lh, stride_lm, k_first, k_last, k_pos, seqlen_q, q_offset, q_stride, below,
                                above, qk_scale, softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_M,
                                PRECISION, VARLEN, TMA, SOFTCAP)

    _store_grad(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh, offs_n, stride_dkn,
                stride_dkd, seqlen_k, dk * softmax_scale, ACCUMULATE, HEAD_DIM_QK, BLOCK_DQK)
    _store_grad(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh, offs_n, stride_dvn,
                stride_dvd, seqlen_k, dv, ACCUMULATE, HEAD_DIM_V, BLOCK_DV)


@triton.jit
def _bwd_dq_inner(dq, q, dout, lse, delta, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
                  q_pos, n_start, n_end, seqlen_k, k_offset, k_stride, below, above, qk_scale, softcap_in,
                  HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
                  SOFTCAP: tl.constexpr):
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _stream_tile(K_src, n0, stride_kn, stride_kd, seqlen_k, MASKED, TMA, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
        v = _stream_tile(V_src, n0, stride_vn, stride_vd, seqlen_k, MASKED, TMA, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
        scores = _capped(_dot(q, tl.trans(k), PRECISION), softcap_in, SOFTCAP)  # unscaled: qk_scale goes into exp2
        probs = tl.math.exp2(scores * qk_scale - lse[:, None])
        if MASKED:
            visible = _band_mask(q_pos, k_offset + offs_n * k_stride, below, above) & (offs_n[None, :] < seqlen_k)
            probs = tl.where(visible, probs, 0.0)
        dprobs = _dot(dout, tl.trans(v), PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        if SOFTCAP:  # through the tanh: its slope 1 - tanh^2
            dscores = dscores * (1.0 - scores * scores)
        dq += _dot(_to_operand(dscores, k.dtype, PRECISION), k, PRECISION)
    return dq


@triton.jit
def _bwd_dq_band(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                 q_first, q_last, q_pos, seqlen_k, k_offset, k_stride, below, above, qk_scale, softcap_in,
                 HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr, SOFTCAP: tl.constexpr):
    """dQ of a query tile from the key tiles of one key block that the band reaches."""
    start, full_start, full_end, end = _band_tiles(q_first, q_last, k_offset, k_stride, seqlen_k,
                                                   below, above, BLOCK_N)
    K_src = _stream_source(K_head, seqlen_k, stride_kn, TMA, HEAD_DIM_QK, BLOCK_N, BLOCK_DQK)
    V_src = _stream_source(V_head, seqlen_k, stride_vn, TMA, HEAD_DIM_V, BLOCK_N, BLOCK_DV)
    dq = _bwd_dq_inner(dq, q, dout, lse, delta, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd, q_pos,
                       start, full_start, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                       softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True, PRECISION, TMA,
                       SOFTCAP)
    dq = _bwd_dq_inner(dq, q, dout, lse, delta, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd, q_pos,
                       full_start, full_end, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                       softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False, PRECISION, TMA,
                       SOFTCAP)
    dq = _bwd_dq_inner(dq, q, dout, lse, delta, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd, q_pos,
                       full_end, end, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                       softcap_in, HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True, PRECISION, TMA,
                       SOFTCAP)
    return dq


# (128x128 / 8 warps spills in its main loop with Triton 3.6, not with 3.9)
@triton.autotune(configs=_configs([(64, 64, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3)]),
                 key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq(Q, K, V, DO, Lse, Delta, DQ, Table, Entries,
            stride_qb, stride_qm, stride_qh, stride_qd,
            stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd,
            stride_dob, stride_dom, stride_doh, stride_dod,
            stride_lb, stride_lh, stride_lm,
            stride_dqb, stride_dqm, stride_dqh, stride_dqd,
            seqlen_q, seqlen_k, nheads, group,
            q_offset, q_stride, k_offset, k_stride, below, above, qk_scale, softcap_in, softmax_scale, seqlen_bucket,
            HEAD_DIM_QK: tl.constexpr, BLOCK_DQK: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
            PRECISION: tl.constexpr, VARLEN: tl.constexpr, ACCUMULATE: tl.constexpr, TMA: tl.constexpr,
            SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch = tl.program_id(1) // nheads
    head = tl.program_id(1) % nheads
    kv_head = head // group
    m0 = tl.program_id(0) * BLOCK_M
    if VARLEN:  # batch is the segment (see _load_row): its query rows and entries
        q_start, seqlen_q, q_offset, first, count = _load_row(Table, batch)
        Q += q_start.to(tl.int64) * stride_qm
        DO += q_start.to(tl.int64) * stride_dom
        Lse += q_start.to(tl.int64) * stride_lm
        Delta += q_start.to(tl.int64) * stride_lm
        DQ += q_start.to(tl.int64) * stride_dqm
    offs_m = m0 + tl.arange(0, BLOCK_M)
    Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    DO_head = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q = _load_tile(Q_head, offs_m, stride_qm, stride_qd, seqlen_q, True, HEAD_DIM_QK, BLOCK_DQK)
    dout = _load_tile(DO_head, offs_m, stride_dom, stride_dod, seqlen_q, True, HEAD_DIM_V, BLOCK_DV)
    lse = _load_lse_base2(Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh,
                          offs_m, stride_lm, seqlen_q, True)
    delta = tl.load(_delta_row(Delta, batch, head, nheads, seqlen_q, stride_lb, stride_lh, VARLEN) + offs_m,
                    mask=offs_m < seqlen_q, other=0.0)

    q_first = q_offset + m0 * q_stride
    q_last = q_offset + (tl.minimum(m0 + BLOCK_M, seqlen_q) - 1) * q_stride
    q_pos = q_offset + offs_m * q_stride
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    if VARLEN:  # every key block of the segment's entries (none past the segment's end)
        for entry in range(first, first + tl.where(m0 < seqlen_q, count, 0)):
            k_start, k_len, k_off, e_below, e_above = _load_row(Entries, entry)
            dq = _bwd_dq_band(dq, q, dout, lse, delta, K_head + k_start.to(tl.int64) * stride_kn,
                              V_head + k_start.to(tl.int64) * stride_vn, stride_kn, stride_kd, stride_vn, stride_vd,
                              q_first, q_last, q_pos, k_len, k_off, k_stride, e_below, e_above, qk_scale, softcap_in,
                              HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, TMA, SOFTCAP)
    else:
        dq = _bwd_dq_band(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                          q_first, q_last, q_pos, seqlen_k, k_offset, k_stride, below, above, qk_scale, softcap_in,
                          HEAD_DIM_QK, BLOCK_DQK, HEAD_DIM_V, BLOCK_DV, BLOCK_N, PRECISION, TMA, SOFTCAP)

    _store_grad(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh, offs_m, stride_dqm, stride_dqd,
                seqlen_q, dq * softmax_scale, ACCUMULATE, HEAD_DIM_QK, BLOCK_DQK)


# ------------------------------------------------------------------------------------------ launchers

def _dot_precision(dtype):
    if dtype == torch.float32:
        return "ieee"  # not tf32: the fp32 path is the accurate one
    return "emulate-bf16" if INTERPRET and dtype == torch.bfloat16 else "tf32"


def _block_d(headdim):
    """The head dim padded to a power of two (at least 16) for the tiles."""
    return max(16, triton.next_power_of_2(headdim))


def _meta(q, v, accumulate, softcap, *streamed):
    """The constexprs every attention kernel takes; ``streamed``: the tensors its loops read tile by tile."""
    headdim_qk, headdim_v = q.shape[-1], v.shape[-1]
    return dict(HEAD_DIM_QK=headdim_qk, BLOCK_DQK=_block_d(headdim_qk), HEAD_DIM_V=headdim_v,
                BLOCK_DV=_block_d(headdim_v), PRECISION=_dot_precision(q.dtype), ACCUMULATE=accumulate,
                TMA=_tma_ok(*streamed), SOFTCAP=softcap is not None)


def _score_scales(scale, softcap):
    """(qk_scale, softcap_in): the factor of the scores in the exp2 argument, and the factor inside the tanh.
    Without softcap the scores are s * scale (in base 2: s * scale * log2 e); with it c tanh(s * scale / c)."""
    if softcap is None:
        return scale * LOG2E, 1.0
    return softcap * LOG2E, scale / softcap


# TMA tensor descriptors (Hopper+) for the tiles the loops stream: Triton >= 3.4 has them; the interpreter of
# Triton 3.9 runs them too. DIST_ATTN_TMA=0 keeps every load on the pointer path (for A/B measurements).
TMA_SUPPORTED = hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")
USE_TMA = TMA_SUPPORTED and os.environ.get("DIST_ATTN_TMA", "1") != "0"
try:  # the allocator Triton holds now, to leave one the caller installed in place
    from triton.runtime._allocation import NullAllocator as _NullAllocator, _allocator as _ALLOCATOR
except ImportError:
    _NullAllocator, _ALLOCATOR = None, None


def _tma_ok(*tensors):
    """Whether every streamed tensor can be read through TMA descriptors: unit last stride, 16-byte aligned
    base and strides (of the dims longer than 1), on a GPU of compute capability >= 9 or the interpreter."""
    if not USE_TMA or not _device_has_tma(tensors[0].device):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16:
            return False
        if any(stride * size % 16 for dim, stride in zip(t.shape[:-1], t.stride()[:-1]) if dim > 1):
            return False
    _set_tma_allocator()
    return True


def _device_has_tma(device):
    """Compute capability >= 9 (Hopper), or the interpreter (which runs descriptors on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 9
    return INTERPRET


def _tma_scratch(size, alignment, stream):
    """Global memory for the descriptors the kernels build on the device (128 bytes per descriptor)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator():
    """Installs ``_tma_scratch`` unless the caller installed an allocator of their own. Triton keeps the
    allocator in a context variable, so this runs on every launch (autograd runs the backward on another
    thread)."""
    if INTERPRET or (_ALLOCATOR is not None and not isinstance(_ALLOCATOR.get(), _NullAllocator)):
        return
    triton.set_allocator(_tma_scratch)


def _all_visible(qpos: Positions, kpos: Positions, below, above):
    """Whether the forward can take its FULL variant: every query sees every key (the band covers the
    largest and the smallest position difference) and every key tile is complete."""
    return (qpos.last - kpos.first <= below and qpos.first - kpos.last >= -above
            and kpos.length % FULL_TILE == 0)


def forward(q, k, v, scale, qpos: Positions, kpos: Positions, below, above, out_dtype, accumulate=None,
            softcap=None):
    """Returns (out in ``out_dtype``, lse float32). ``accumulate``: float32 (out, lse) accumulators of
    earlier key blocks, shaped like the result; the block is merged into them in place and they are
    returned (``dist_attn.kernels.merge`` rule, fused into the kernel's epilogue)."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    if accumulate is not None:
        out, lse = accumulate
    else:
        # The interpreter truncates float32 -> bfloat16 in stores; let torch round the result instead.
        kernel_dtype = torch.float32 if INTERPRET and out_dtype == torch.bfloat16 else out_dtype
        out = torch.empty(q.shape[:3] + v.shape[3:], dtype=kernel_dtype, device=q.device)
        lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, lse, None, None, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        seqlen_q, seqlen_k, nheads, nheads // nheads_kv,
        qpos.offset, qpos.stride, kpos.offset, kpos.stride, below, above, *_score_scales(scale, softcap),
        _seqlen_bucket(max(seqlen_q, seqlen_k)), VARLEN=False, FULL=_all_visible(qpos, kpos, below, above),
        **_meta(q, v, accumulate is not None, softcap, k, v))
    return (out, lse) if accumulate is not None else (out.to(out_dtype), lse)


def backward(dout, q, k, v, out, lse, scale, qpos: Positions, kpos: Positions, below, above, accumulate=None,
             softcap=None):
    """dq, dk, dv in float32; with ``accumulate`` (float32 (dq, dk, dv) shaped like q, k, v) they are added
    into those in place and returned."""
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_kv, headdim_v = k.shape[1], k.shape[2], v.shape[3]
    delta = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    _bwd_preprocess[(triton.cdiv(seqlen_q, 64), batch * nheads)](
        out, dout, delta, *out.stride(), *dout.stride(), seqlen_q, nheads,
        HEAD_DIM=headdim_v, BLOCK_D=_block_d(headdim_v), BLOCK_M=64)
    if accumulate is not None:
        dq, dk, dv = accumulate
    else:
        dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
        dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    common = (seqlen_q, seqlen_k, nheads, nheads // nheads_kv,
              qpos.offset, qpos.stride, kpos.offset, kpos.stride, below, above, *_score_scales(scale, softcap), scale,
              _seqlen_bucket(max(seqlen_q, seqlen_k)))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
    _bwd_dkdv[lambda m: (triton.cdiv(seqlen_k, m["BLOCK_N"]), batch * nheads_kv)](
        q, k, v, dout, lse, delta, dk, dv, None, None, *strides, *dk.stride(), *dv.stride(), *common, VARLEN=False,
        **_meta(q, v, accumulate is not None, softcap, q, dout))
    _bwd_dq[lambda m: (triton.cdiv(seqlen_q, m["BLOCK_M"]), batch * nheads)](
        q, k, v, dout, lse, delta, dq, None, None, *strides, *dq.stride(), *common, VARLEN=False,
        **_meta(q, v, accumulate is not None, softcap, k, v))
    return dq, dk, dv


# ------------------------------------------------------------------------- packed (variable-length) launchers

def _segment_tables(pairs, side, device):
    """(segments, entries, longest segment): the int32 tables of ``PackedPair`` s (see _load_row) for the kernels
    that own ``side``'s rows ("q": forward and dQ, "k": dK/dV). Rows that several pairs cover (mask slices that
    meet the same queries) are cut at every pair boundary, so that segments never share a row: each program
    then writes rows no other program writes, and a row's entries are all the blocks it meets."""
    own = (lambda p: (p.q_start, p.q)) if side == "q" else (lambda p: (p.k_start, p.k))  # noqa: E731
    other = (lambda p: (p.k_start, p.k)) if side == "q" else (lambda p: (p.q_start, p.q))  # noqa: E731
    cuts = sorted({row for p in pairs for row in (own(p)[0], own(p)[0] + own(p)[1].length)})
    pieces = {}  # first row -> [end row, position of the first row, entries]
    for p in pairs:
        start, pos = own(p)
        other_start, other_pos = other(p)
        entry = (other_start, other_pos.length, other_pos.offset, p.below, p.above)
        i = bisect.bisect_left(cuts, start)
        while cuts[i] < start + pos.length:
            offset = pos.offset + (cuts[i] - start) * pos.stride
            piece = pieces.setdefault(cuts[i], [cuts[i + 1], offset, []])
            if piece[1] != offset:
                raise ValueError(f"pairs give {side} row {cuts[i]} two positions ({piece[1]} and {offset})")
            piece[2].append(entry)
            i += 1
    segments, entries = [], []
    for first_row in sorted(pieces):
        end_row, offset, blocks = pieces[first_row]
        segments.append((first_row, end_row - first_row, offset, len(entries), len(blocks)))
        entries += blocks
    as_table = lambda rows: torch.tensor(rows, dtype=torch.int32, device=device)  # noqa: E731
    return as_table(segments), as_table(entries), max(row[1] for row in segments)


def _check_strides(pairs):
    """The launches pass one q and one k position stride for all pairs."""
    strides = {(p.q.stride, p.k.stride) for p in pairs}
    if len(strides) > 1:
        raise ValueError(f"the pairs of one call must share their q and k position strides; got {sorted(strides)}")
    return strides.pop()


def _packed_strides(t):
    """Strides of a packed tensor seen as one batch with batch stride 0: the kernels' batch index is then
    the row of the segment table and moves no pointer."""
    return (0, *t.stride())


def forward_varlen(q, k, v, scale, pairs, out, lse, accumulate=False, softcap=None):
    """Every (query rows, key rows, band) pair (``PackedPair`` s: packed sequences, or the pieces of a mask;
    sharing q and k position strides) in one launch. Writes the rows of ``out`` (total_q, H, D) and ``lse``
    (H, total_q) that pairs cover, or with ``accumulate`` merges into the float32 (out, lse) there; other rows
    are left as they are."""
    nheads, nheads_kv = q.shape[1], k.shape[1]
    q_stride, k_stride = _check_strides(pairs)
    segments, entries, max_q = _segment_tables(pairs, "q", q.device)
    max_k = max(p.k.length for p in pairs)
    # The interpreter truncates float32 -> bfloat16 in stores (see forward): compute in float32, copy back.
    kernel_out = out
    if INTERPRET and out.dtype == torch.bfloat16:
        kernel_out = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), len(segments) * nheads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, kernel_out, lse, segments, entries, *_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
        *_packed_strides(kernel_out), *_packed_strides(lse), max_q, max_k, nheads, nheads // nheads_kv,
        0, q_stride, 0, k_stride, 0, 0, *_score_scales(scale, softcap),  # per segment and entry: the tables
        _seqlen_bucket(max(max_q, max_k)), VARLEN=True, FULL=False, **_meta(q, v, accumulate, softcap, k, v))
    if kernel_out is not out:
        rows = torch.cat([torch.arange(p.q_start, p.q_start + p.q.length) for p in pairs])
        out[rows] = kernel_out[rows].to(out.dtype)


def backward_varlen(dout, q, k, v, out, lse, scale, pairs, dq, dk, dv, accumulate=False, softcap=None):
    """Gradients of ``forward_varlen``, one launch per kernel: writes the rows of dq, dk, dv (float32, shaped
    like q, k, v) that pairs cover, or with ``accumulate`` adds to what those rows hold."""
    total_q, nheads, _ = q.shape
    nheads_kv, headdim_v = k.shape[1], v.shape[2]
    q_stride, k_stride = _check_strides(pairs)
    q_segments, k_entries, max_q = _segment_tables(pairs, "q", q.device)
    k_segments, q_entries, max_k = _segment_tables(pairs, "k", q.device)
    # delta over all packed rows as one sequence: (1, H, total_q), the layout of a contiguous lse
    lse = lse.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    _bwd_preprocess[(triton.cdiv(total_q, 64), nheads)](
        out, dout, delta, *_packed_strides(out), *_packed_strides(dout), total_q, nheads,
        HEAD_DIM=headdim_v, BLOCK_D=_block_d(headdim_v), BLOCK_M=64)
    common = (max_q, max_k, nheads, nheads // nheads_kv,
              0, q_stride, 0, k_stride, 0, 0, *_score_scales(scale, softcap), scale,  # per segment: the tables
              _seqlen_bucket(max(max_q, max_k)))
    strides = (*_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *_packed_strides(dout),
               *_packed_strides(lse))
    _bwd_dkdv[lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), len(k_segments) * nheads_kv)](
        q, k, v, dout, lse, delta, dk, dv, k_segments, q_entries, *strides, *_packed_strides(dk), *_packed_strides(dv),
        *common, VARLEN=True, **_meta(q, v, accumulate, softcap, q, dout))
    _bwd_dq[lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), len(q_segments) * nheads)](
        q, k, v, dout, lse, delta, dq, q_segments, k_entries, *strides, *_packed_strides(dq), *common, VARLEN=True,
        **_meta(q, v, accumulate, softcap, k, v))
