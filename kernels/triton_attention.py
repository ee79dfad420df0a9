"""Tiled, IO-aware flash attention in Triton, with positions and an external LSE.

Algorithm (FlashAttention-2, Dao 2023; Triton's fused-attention tutorial): each program owns a tile of
BLOCK_M query rows, streams BLOCK_N-key tiles of K and V through on-chip memory and keeps an online
softmax (running max ``m``, running sum ``l``, un-normalised output ``acc``) in float32. Scores are kept
in base 2 (``qk_scale = softmax_scale * log2(e)``) so the inner loop uses ``exp2``; the stored LSE is
natural-log. The seqlen x seqlen matrix never exists in memory.

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

Packed variable-length sequences (``forward_varlen`` / ``backward_varlen``): the same kernels with
``VARLEN=True`` run every sequence of a call in one launch per kernel, each program reading its
sequence's rows, positions and band from a small int32 table (see ``_load_pair``).

Run the tests under the interpreter on CPU:  TRITON_INTERPRET=1 pytest tests/test_kernels.py
"""

from __future__ import annotations

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


def _configs(tile_shapes):
    """Autotune space for 16-bit inputs: (BLOCK_M, BLOCK_N) x warps x pipeline stages."""
    if INTERPRET:  # one config (no timing runs); 32-wide so that test-sized inputs cross tile boundaries
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            for bm, bn in tile_shapes for warps in (4, 8) for stages in (2, 3)]


def _prune_configs(configs, named_args, **kwargs):
    """float32 gets _IEEE_CONFIG; headdim 256 gets tiles of at most 64 rows (shared memory)."""
    meta = {**named_args, **kwargs}
    if meta["PRECISION"] == "ieee":
        return [_IEEE_CONFIG]
    limit = 64 if meta["BLOCK_D"] >= 256 else 128
    kept = [c for c in configs if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) <= limit]
    return kept or configs[:1]


_TUNE_KEY = ["seqlen_bucket", "BLOCK_D", "PRECISION", "VARLEN"]
_PRUNE = {"early_config_prune": _prune_configs}
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


# Packed sequences (VARLEN): one launch covers every sequence of the call. Row p of the int32 pair table
# ``Table`` (shape (npairs, 8), contiguous; built by ``_pair_table``) describes sequence p:
#     q_start, q_len, q_offset, k_start, k_len, k_offset, below, above
# Programs of grid axis 1 take row ``program_id(1) // nheads`` (``// nheads_kv`` in _bwd_dkdv) where a
# batched call takes the batch; the packed tensors are passed as one batch with batch stride 0, so that
# index moves no pointer. The row's starts shift the base pointers along the sequence axis and its
# lengths, offsets and band replace the scalar arguments. Grid axis 0 covers the longest sequence;
# programs past the end of a shorter one get empty tile ranges (``_empty_if``), and their masked stores
# write nothing.


@triton.jit
def _load_pair(Table, pair):
    """Row ``pair`` of the pair table: (q_start, q_len, q_offset, k_start, k_len, k_offset, below, above)."""
    row = Table + pair * 8
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
            tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7))


@triton.jit
def _empty_if(done, start, full_start, full_end, end):
    """The tile ranges of _band_tiles, made empty when ``done`` (the program's tile is past its sequence)."""
    return (tl.where(done, 0, start), tl.where(done, 0, full_start), tl.where(done, 0, full_end),
            tl.where(done, 0, end))


@triton.jit
def _delta_row(Delta, batch, head, nheads, seqlen_q, stride_lb, stride_lh, VARLEN: tl.constexpr):
    """Start of delta's row for (batch, head). delta is (batch, nheads, seqlen_q), contiguous; for packed
    sequences it is laid out like the (contiguous) LSE and already shifted to the pair's first row."""
    if VARLEN:
        return Delta + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
    return Delta + (batch * nheads + head).to(tl.int64) * seqlen_q


@triton.jit
def _band_mask(q_pos, k_pos, below, above):
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff <= below) & (diff >= -above)


# -------------------------------------------------------------------------------------------- forward

@triton.jit
def _fwd_inner(acc, row_max, row_sum, q, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
               q_pos, n_start, n_end, seqlen_k, k_offset, k_stride, below, above, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K_head, offs_n, stride_kn, stride_kd, seqlen_k, MASKED, HEAD_DIM, BLOCK_D)
        scores = _dot(q, tl.trans(k), PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        if MASKED:
            visible = _band_mask(q_pos, k_offset + offs_n * k_stride, below, above) & (offs_n[None, :] < seqlen_k)
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing visible yet
        else:
            new_max = tl.maximum(row_max, tl.max(scores, 1))
            safe_max = new_max
        probs = tl.math.exp2(scores - safe_max[:, None])
        rescale = tl.math.exp2(row_max - safe_max)
        row_sum = row_sum * rescale + tl.sum(probs, 1)
        v = _load_tile(V_head, offs_n, stride_vn, stride_vd, seqlen_k, MASKED, HEAD_DIM, BLOCK_D)
        acc = acc * rescale[:, None] + _dot(_to_operand(probs, v.dtype, PRECISION), v, PRECISION)
        row_max = new_max
    return acc, row_max, row_sum


@triton.autotune(configs=_configs([(64, 32), (64, 64), (128, 64), (128, 128)]), key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(Q, K, V, Out, Lse, Table,
                stride_qb, stride_qm, stride_qh, stride_qd,
                stride_kb, stride_kn, stride_kh, stride_kd,
                stride_vb, stride_vn, stride_vh, stride_vd,
                stride_ob, stride_om, stride_oh, stride_od,
                stride_lb, stride_lh, stride_lm,
                seqlen_q, seqlen_k, nheads, group,
                q_offset, q_stride, k_offset, k_stride, below, above, qk_scale, seqlen_bucket,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    batch = tl.program_id(1) // nheads
    head = tl.program_id(1) % nheads
    kv_head = head // group
    m0 = pid_m * BLOCK_M
    if VARLEN:  # batch is the row of the pair table (see _load_pair)
        q_start, seqlen_q, q_offset, k_start, seqlen_k, k_offset, below, above = _load_pair(Table, batch)
        Q += q_start.to(tl.int64) * stride_qm
        Out += q_start.to(tl.int64) * stride_om
        Lse += q_start.to(tl.int64) * stride_lm
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    offs_m = m0 + tl.arange(0, BLOCK_M)
    Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q = _load_tile(Q_head, offs_m, stride_qm, stride_qd, seqlen_q, True, HEAD_DIM, BLOCK_D)

    q_first = q_offset + m0 * q_stride
    q_last = q_offset + (tl.minimum(m0 + BLOCK_M, seqlen_q) - 1) * q_stride
    start, full_start, full_end, end = _band_tiles(q_first, q_last, k_offset, k_stride, seqlen_k,
                                                   below, above, BLOCK_N)
    if VARLEN:
        start, full_start, full_end, end = _empty_if(m0 >= seqlen_q, start, full_start, full_end, end)
    q_pos = q_offset + offs_m * q_stride
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    # masked head, unmasked middle, masked tail (see _band_tiles)
    acc, row_max, row_sum = _fwd_inner(acc, row_max, row_sum, q, K_head, V_head, stride_kn, stride_kd, stride_vn,
                                       stride_vd, q_pos, start, full_start, seqlen_k, k_offset, k_stride, below,
                                       above, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)
    acc, row_max, row_sum = _fwd_inner(acc, row_max, row_sum, q, K_head, V_head, stride_kn, stride_kd, stride_vn,
                                       stride_vd, q_pos, full_start, full_end, seqlen_k, k_offset, k_stride, below,
                                       above, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    acc, row_max, row_sum = _fwd_inner(acc, row_max, row_sum, q, K_head, V_head, stride_kn, stride_kd, stride_vn,
                                       stride_vd, q_pos, full_end, end, seqlen_k, k_offset, k_stride, below,
                                       above, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)

    empty = row_sum == 0.0  # no visible key: output 0, LSE -inf
    out = acc / tl.where(empty, 1.0, row_sum)[:, None]
    lse = tl.where(empty, float("-inf"), (row_max + tl.math.log2(tl.where(empty, 1.0, row_sum))) / 1.4426950408889634)
    _store_tile(Out + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh, offs_m, stride_om, stride_od,
                seqlen_q, out, HEAD_DIM, BLOCK_D)
    l_ptrs = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh + offs_m * stride_lm
    tl.store(l_ptrs, lse, mask=offs_m < seqlen_q)


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
def _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row,
                    stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
                    k_pos, m_start, m_end, seqlen_q, q_offset, q_stride, below, above, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        q = _load_tile(Q_head, offs_m, stride_qm, stride_qd, seqlen_q, MASKED, HEAD_DIM, BLOCK_D)
        dout = _load_tile(DO_head, offs_m, stride_dom, stride_dod, seqlen_q, MASKED, HEAD_DIM, BLOCK_D)
        lse = _load_lse_base2(Lse_row, offs_m, stride_lm, seqlen_q, MASKED)
        if MASKED:
            delta = tl.load(Delta_row + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            delta = tl.load(Delta_row + offs_m)
        scores_t = _dot(k, tl.trans(q), PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        probs_t = tl.math.exp2(scores_t - lse[None, :])
        if MASKED:
            # (keys x queries): kp - above <= qp <= kp + below is the band seen from the keys
            visible_t = _band_mask(k_pos, q_offset + offs_m * q_stride, above, below) & (offs_m[None, :] < seqlen_q)
            probs_t = tl.where(visible_t, probs_t, 0.0)
        dv += _dot(_to_operand(probs_t, dout.dtype, PRECISION), dout, PRECISION)
        dprobs_t = _dot(v, tl.trans(dout), PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk += _dot(_to_operand(dscores_t, q.dtype, PRECISION), q, PRECISION)
    return dk, dv


@triton.autotune(configs=_configs([(32, 64), (64, 64), (32, 128), (64, 128)]), key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv(Q, K, V, DO, Lse, Delta, DK, DV, Table,
              stride_qb, stride_qm, stride_qh, stride_qd,
              stride_kb, stride_kn, stride_kh, stride_kd,
              stride_vb, stride_vn, stride_vh, stride_vd,
              stride_dob, stride_dom, stride_doh, stride_dod,
              stride_lb, stride_lh, stride_lm,
              stride_dkb, stride_dkn, stride_dkh, stride_dkd,
              stride_dvb, stride_dvn, stride_dvh, stride_dvd,
              seqlen_q, seqlen_k, nheads, group,
              q_offset, q_stride, k_offset, k_stride, below, above, qk_scale, softmax_scale, seqlen_bucket,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    nheads_kv = nheads // group
    batch = tl.program_id(1) // nheads_kv
    kv_head = tl.program_id(1) % nheads_kv
    n0 = tl.program_id(0) * BLOCK_N
    if VARLEN:  # batch is the row of the pair table (see _load_pair)
        q_start, seqlen_q, q_offset, k_start, seqlen_k, k_offset, below, above = _load_pair(Table, batch)
        Q += q_start.to(tl.int64) * stride_qm
        DO += q_start.to(tl.int64) * stride_dom
        Lse += q_start.to(tl.int64) * stride_lm
        Delta += q_start.to(tl.int64) * stride_lm
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
        DK += k_start.to(tl.int64) * stride_dkn
        DV += k_start.to(tl.int64) * stride_dvn
    offs_n = n0 + tl.arange(0, BLOCK_N)
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    k = _load_tile(K_head, offs_n, stride_kn, stride_kd, seqlen_k, True, HEAD_DIM, BLOCK_D)
    v = _load_tile(V_head, offs_n, stride_vn, stride_vd, seqlen_k, True, HEAD_DIM, BLOCK_D)

    # Seen from the keys, query qp is visible iff kp - above <= qp <= kp + below: the band mirrored.
    k_first = k_offset + n0 * k_stride
    k_last = k_offset + (tl.minimum(n0 + BLOCK_N, seqlen_k) - 1) * k_stride
    start, full_start, full_end, end = _band_tiles(k_first, k_last, q_offset, q_stride, seqlen_q,
                                                   above, below, BLOCK_M)
    if VARLEN:
        start, full_start, full_end, end = _empty_if(n0 >= seqlen_k, start, full_start, full_end, end)
    k_pos = k_offset + offs_n * k_stride
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, group):  # every query head that reads this KV head: a deterministic GQA sum
        head = kv_head * group + g
        Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        DO_head = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        Lse_row = Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh
        Delta_row = _delta_row(Delta, batch, head, nheads, seqlen_q, stride_lb, stride_lh, VARLEN)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, stride_qm, stride_qd,
                                 stride_dom, stride_dod, stride_lm, k_pos, start, full_start, seqlen_q, q_offset,
                                 q_stride, below, above, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, stride_qm, stride_qd,
                                 stride_dom, stride_dod, stride_lm, k_pos, full_start, full_end, seqlen_q, q_offset,
                                 q_stride, below, above, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, PRECISION)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_head, DO_head, Lse_row, Delta_row, stride_qm, stride_qd,
                                 stride_dom, stride_dod, stride_lm, k_pos, full_end, end, seqlen_q, q_offset,
                                 q_stride, below, above, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, PRECISION)

    _store_tile(DK + batch.to(tl.int64) * stride_dkb + kv_head.to(tl.int64) * stride_dkh, offs_n, stride_dkn,
                stride_dkd, seqlen_k, dk * softmax_scale, HEAD_DIM, BLOCK_D)
    _store_tile(DV + batch.to(tl.int64) * stride_dvb + kv_head.to(tl.int64) * stride_dvh, offs_n, stride_dvn,
                stride_dvd, seqlen_k, dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd,
                  q_pos, n_start, n_end, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASKED: tl.constexpr, PRECISION: tl.constexpr):
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(K_head, offs_n, stride_kn, stride_kd, seqlen_k, MASKED, HEAD_DIM, BLOCK_D)
        v = _load_tile(V_head, offs_n, stride_vn, stride_vd, seqlen_k, MASKED, HEAD_DIM, BLOCK_D)
        scores = _dot(q, tl.trans(k), PRECISION) * qk_scale
        probs = tl.math.exp2(scores - lse[:, None])
        if MASKED:
            visible = _band_mask(q_pos, k_offset + offs_n * k_stride, below, above) & (offs_n[None, :] < seqlen_k)
            probs = tl.where(visible, probs, 0.0)
        dprobs = _dot(dout, tl.trans(v), PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += _dot(_to_operand(dscores, k.dtype, PRECISION), k, PRECISION)
    return dq


@triton.autotune(configs=_configs([(64, 32), (64, 64), (128, 32), (128, 64)]), key=_TUNE_KEY, prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq(Q, K, V, DO, Lse, Delta, DQ, Table,
            stride_qb, stride_qm, stride_qh, stride_qd,
            stride_kb, stride_kn, stride_kh, stride_kd,
            stride_vb, stride_vn, stride_vh, stride_vd,
            stride_dob, stride_dom, stride_doh, stride_dod,
            stride_lb, stride_lh, stride_lm,
            stride_dqb, stride_dqm, stride_dqh, stride_dqd,
            seqlen_q, seqlen_k, nheads, group,
            q_offset, q_stride, k_offset, k_stride, below, above, qk_scale, softmax_scale, seqlen_bucket,
            HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, VARLEN: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    batch = tl.program_id(1) // nheads
    head = tl.program_id(1) % nheads
    kv_head = head // group
    m0 = tl.program_id(0) * BLOCK_M
    if VARLEN:  # batch is the row of the pair table (see _load_pair)
        q_start, seqlen_q, q_offset, k_start, seqlen_k, k_offset, below, above = _load_pair(Table, batch)
        Q += q_start.to(tl.int64) * stride_qm
        DO += q_start.to(tl.int64) * stride_dom
        Lse += q_start.to(tl.int64) * stride_lm
        Delta += q_start.to(tl.int64) * stride_lm
        DQ += q_start.to(tl.int64) * stride_dqm
        K += k_start.to(tl.int64) * stride_kn
        V += k_start.to(tl.int64) * stride_vn
    offs_m = m0 + tl.arange(0, BLOCK_M)
    Q_head = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    DO_head = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    K_head = K + batch.to(tl.int64) * stride_kb + kv_head.to(tl.int64) * stride_kh
    V_head = V + batch.to(tl.int64) * stride_vb + kv_head.to(tl.int64) * stride_vh
    q = _load_tile(Q_head, offs_m, stride_qm, stride_qd, seqlen_q, True, HEAD_DIM, BLOCK_D)
    dout = _load_tile(DO_head, offs_m, stride_dom, stride_dod, seqlen_q, True, HEAD_DIM, BLOCK_D)
    lse = _load_lse_base2(Lse + batch.to(tl.int64) * stride_lb + head.to(tl.int64) * stride_lh,
                          offs_m, stride_lm, seqlen_q, True)
    delta = tl.load(_delta_row(Delta, batch, head, nheads, seqlen_q, stride_lb, stride_lh, VARLEN) + offs_m,
                    mask=offs_m < seqlen_q, other=0.0)

    q_first = q_offset + m0 * q_stride
    q_last = q_offset + (tl.minimum(m0 + BLOCK_M, seqlen_q) - 1) * q_stride
    start, full_start, full_end, end = _band_tiles(q_first, q_last, k_offset, k_stride, seqlen_k,
                                                   below, above, BLOCK_N)
    if VARLEN:
        start, full_start, full_end, end = _empty_if(m0 >= seqlen_q, start, full_start, full_end, end)
    q_pos = q_offset + offs_m * q_stride
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, q_pos,
                       start, full_start, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)
    dq = _bwd_dq_inner(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, q_pos,
                       full_start, full_end, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, False, PRECISION)
    dq = _bwd_dq_inner(dq, q, dout, lse, delta, K_head, V_head, stride_kn, stride_kd, stride_vn, stride_vd, q_pos,
                       full_end, end, seqlen_k, k_offset, k_stride, below, above, qk_scale,
                       HEAD_DIM, BLOCK_D, BLOCK_N, True, PRECISION)

    _store_tile(DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh, offs_m, stride_dqm, stride_dqd,
                seqlen_q, dq * softmax_scale, HEAD_DIM, BLOCK_D)


# ------------------------------------------------------------------------------------------ launchers

def _dot_precision(dtype):
    if dtype == torch.float32:
        return "ieee"  # not tf32: the fp32 path is the accurate one
    return "emulate-bf16" if INTERPRET and dtype == torch.bfloat16 else "tf32"


def _meta(q, k):
    headdim = q.shape[-1]
    return dict(HEAD_DIM=headdim, BLOCK_D=max(16, triton.next_power_of_2(headdim)),
                PRECISION=_dot_precision(q.dtype))


def forward(q, k, v, scale, qpos: Positions, kpos: Positions, below, above, out_dtype):
    batch, seqlen_q, nheads, _ = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    # The interpreter truncates float32 -> bfloat16 in stores; let torch round the result instead.
    kernel_dtype = torch.float32 if INTERPRET and out_dtype == torch.bfloat16 else out_dtype
    out = torch.empty(q.shape, dtype=kernel_dtype, device=q.device)
    lse = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, out, lse, None, *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
        seqlen_q, seqlen_k, nheads, nheads // nheads_kv,
        qpos.offset, qpos.stride, kpos.offset, kpos.stride, below, above, scale * LOG2E,
        _seqlen_bucket(max(seqlen_q, seqlen_k)), VARLEN=False, **_meta(q, k))
    return out.to(out_dtype), lse


def backward(dout, q, k, v, out, lse, scale, qpos: Positions, kpos: Positions, below, above):
    """dq, dk, dv in float32."""
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    meta = _meta(q, k)
    delta = torch.empty((batch, nheads, seqlen_q), dtype=torch.float32, device=q.device)
    _bwd_preprocess[(triton.cdiv(seqlen_q, 64), batch * nheads)](
        out, dout, delta, *out.stride(), *dout.stride(), seqlen_q, nheads,
        HEAD_DIM=headdim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=64)
    dq = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.empty(k.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty(v.shape, dtype=torch.float32, device=q.device)
    common = (seqlen_q, seqlen_k, nheads, nheads // nheads_kv,
              qpos.offset, qpos.stride, kpos.offset, kpos.stride, below, above, scale * LOG2E, scale,
              _seqlen_bucket(max(seqlen_q, seqlen_k)))
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride())
    _bwd_dkdv[lambda m: (triton.cdiv(seqlen_k, m["BLOCK_N"]), batch * nheads_kv)](
        q, k, v, dout, lse, delta, dk, dv, None, *strides, *dk.stride(), *dv.stride(), *common, VARLEN=False, **meta)
    _bwd_dq[lambda m: (triton.cdiv(seqlen_q, m["BLOCK_M"]), batch * nheads)](
        q, k, v, dout, lse, delta, dq, None, *strides, *dq.stride(), *common, VARLEN=False, **meta)
    return dq, dk, dv


# ------------------------------------------------------------------------- packed (variable-length) launchers

def _pair_table(pairs, device):
    """The int32 pair table of ``PackedPair`` s (see _load_pair) and the longest q and k lengths."""
    rows = [(p.q_start, p.q.length, p.q.offset, p.k_start, p.k.length, p.k.offset, p.below, p.above)
            for p in pairs]
    table = torch.tensor(rows, dtype=torch.int32, device=device)
    return table, max(p.q.length for p in pairs), max(p.k.length for p in pairs)


def _packed_strides(t):
    """Strides of a packed tensor seen as one batch with batch stride 0: the kernels' batch index is then
    the row of the pair table and moves no pointer."""
    return (0, *t.stride())


def forward_varlen(q, k, v, scale, pairs, out, lse):
    """All packed sequences (``PackedPair`` s, sharing q and k position strides) in one launch. Writes
    their rows of ``out`` (total_q, H, D) and ``lse`` (H, total_q); other rows are left as they are."""
    nheads, nheads_kv = q.shape[1], k.shape[1]
    table, max_q, max_k = _pair_table(pairs, q.device)
    # The interpreter truncates float32 -> bfloat16 in stores (see forward): compute in float32, copy back.
    kernel_out = out
    if INTERPRET and out.dtype == torch.bfloat16:
        kernel_out = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    grid = lambda meta: (triton.cdiv(max_q, meta["BLOCK_M"]), len(pairs) * nheads)  # noqa: E731
    _fwd_kernel[grid](
        q, k, v, kernel_out, lse, table, *_packed_strides(q), *_packed_strides(k), *_packed_strides(v),
        *_packed_strides(kernel_out), *_packed_strides(lse), max_q, max_k, nheads, nheads // nheads_kv,
        0, pairs[0].q.stride, 0, pairs[0].k.stride, 0, 0, scale * LOG2E,  # per pair: from the table
        _seqlen_bucket(max(max_q, max_k)), VARLEN=True, **_meta(q, k))
    if kernel_out is not out:
        rows = torch.cat([torch.arange(p.q_start, p.q_start + p.q.length) for p in pairs])
        out[rows] = kernel_out[rows].to(out.dtype)


def backward_varlen(dout, q, k, v, out, lse, scale, pairs, dq, dk, dv):
    """Gradients of ``forward_varlen``, one launch per kernel: writes each pair's rows of dq, dk, dv
    (float32, shaped like q, k, v)."""
    total_q, nheads, headdim = q.shape
    nheads_kv = k.shape[1]
    table, max_q, max_k = _pair_table(pairs, q.device)
    meta = _meta(q, k)
    # delta over all packed rows as one sequence: (1, H, total_q), the layout of a contiguous lse
    lse = lse.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    _bwd_preprocess[(triton.cdiv(total_q, 64), nheads)](
        out, dout, delta, *_packed_strides(out), *_packed_strides(dout), total_q, nheads,
        HEAD_DIM=headdim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=64)
    common = (max_q, max_k, nheads, nheads // nheads_kv,
              0, pairs[0].q.stride, 0, pairs[0].k.stride, 0, 0, scale * LOG2E, scale,  # per pair: from the table
              _seqlen_bucket(max(max_q, max_k)))
    strides = (*_packed_strides(q), *_packed_strides(k), *_packed_strides(v), *_packed_strides(dout),
               *_packed_strides(lse))
    _bwd_dkdv[lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), len(pairs) * nheads_kv)](
        q, k, v, dout, lse, delta, dk, dv, table, *strides, *_packed_strides(dk), *_packed_strides(dv), *common,
        VARLEN=True, **meta)
    _bwd_dq[lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), len(pairs) * nheads)](
        q, k, v, dout, lse, delta, dq, table, *strides, *_packed_strides(dq), *common, VARLEN=True, **meta)
