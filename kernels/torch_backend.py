"""Chunked online-softmax attention in plain PyTorch: the default on CPU tensors.

Same contract as the Triton kernels (positions, band mask, external LSE in the backward, float32
results) but written with tensor ops over ``CHUNK x CHUNK`` tiles, so memory is O(seqlen * CHUNK)
instead of O(seqlen^2). Tiles outside the band are skipped and only tiles the band cuts are masked.
GQA is a broadcast over a group axis: K/V are never repeated.
"""

from __future__ import annotations

import torch

from .merge import merge_
from .positions import Positions, fully_visible, visible_range

CHUNK = 256
TILE_BYTES = 1 << 19  # float32 tiles stay below this: fewer query rows per tile for many heads x batch


def _math_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x, nheads_kv):
    """(B, L, H, D) -> (B, Hkv, G, L, D) with G = H // Hkv; query head h = kv_head * G + g."""
    batch, seqlen, nheads, headdim = x.shape
    return x.view(batch, seqlen, nheads_kv, nheads // nheads_kv, headdim).permute(0, 2, 3, 1, 4)


def _ungrouped(x):
    """(B, Hkv, G, L, D) -> (B, L, H, D)."""
    batch, nheads_kv, group, seqlen, headdim = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(batch, seqlen, nheads_kv * group, headdim)


def _tiles(qpos: Positions, kpos: Positions, below, above, rows=CHUNK):
    """Yields (q_slice, k_slice, mask) for every tile (``rows`` queries x CHUNK keys) the band touches, query
    chunk by query chunk; mask is None for full tiles."""
    for q_start in range(0, qpos.length, rows):
        q_end = min(q_start + rows, qpos.length)
        q_first, q_last = qpos.at(q_start), qpos.at(q_end - 1)
        k_lo, k_hi = visible_range(q_first, q_last, kpos, below, above)
        for k_start in range(k_lo, k_hi, CHUNK):
            k_end = min(k_start + CHUNK, k_hi)
            mask = None
            if not fully_visible(q_first, q_last, kpos.at(k_start), kpos.at(k_end - 1), below, above):
                qp = qpos.at(torch.arange(q_start, q_end))
                kp = kpos.at(torch.arange(k_start, k_end))
                diff = qp[:, None] - kp[None, :]
                mask = (diff <= below) & (diff >= -above)
            yield slice(q_start, q_end), slice(k_start, k_end), mask


def _softcapped_(scores, softcap):
    """scores <- softcap * tanh(scores / softcap), in place (no-op for None)."""
    if softcap is not None:
        scores.div_(softcap).tanh_().mul_(softcap)
    return scores


def forward(q, k, v, scale, qpos: Positions, kpos: Positions, below, above, out_dtype, accumulate=None,
            softcap=None):
    """Returns out (B, Lq, H, Dv) in ``out_dtype`` and lse (B, H, Lq) in the math dtype: float32, or
    float64 for float64 inputs (which only internal callers pass: the demo's chunked reference).
    ``accumulate``: float32 (out, lse) to merge the result into (``merge_``) and return."""
    if accumulate is not None:
        block_out, block_lse = forward(q, k, v, scale, qpos, kpos, below, above, torch.float32, softcap=softcap)
        merge_(*accumulate, block_out, block_lse)
        return accumulate
    math = _math_dtype(q.dtype)
    nheads_kv = k.shape[2]
    qg = _grouped(q, nheads_kv)                               # (B, Hkv, G, Lq, D), a view: cast chunk by chunk
    kg, vg = (x.permute(0, 2, 1, 3).unsqueeze(2) for x in (k, v))  # (B, Hkv, 1, Lk, D), views
    stats_shape = qg.shape[:-1] + (1,)
    row_max = torch.full(stats_shape, float("-inf"), dtype=math, device=q.device)
    row_sum = torch.zeros(stats_shape, dtype=math, device=q.device)
    acc = torch.zeros(qg.shape[:-1] + v.shape[-1:], dtype=math, device=q.device)
    chunk = None
    for qs, ks, mask in _tiles(qpos, kpos, below, above, _tile_rows(q.shape[0], q.shape[2])):
        if qs != chunk:
            chunk, q_c = qs, qg[..., qs, :].to(math)
        scores = (q_c @ kg[..., ks, :].to(math).transpose(-1, -2)).mul_(scale)  # the tile math runs in place
        _softcapped_(scores, softcap)
        if mask is not None:
            scores.masked_fill_(~mask.to(q.device), float("-inf"))
        new_max = torch.maximum(row_max[..., qs, :], scores.amax(dim=-1, keepdim=True))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        probs = scores.sub_(safe_max).exp_()
        rescale = torch.exp(row_max[..., qs, :] - safe_max)
        row_sum[..., qs, :] = row_sum[..., qs, :] * rescale + probs.sum(dim=-1, keepdim=True)
        acc[..., qs, :] = acc[..., qs, :] * rescale + probs @ vg[..., ks, :].to(math)
        row_max[..., qs, :] = new_max
        del scores, probs  # before the next tile is made
    empty = row_sum == 0
    out = acc / torch.where(empty, torch.ones_like(row_sum), row_sum)
    lse = torch.where(empty, torch.full_like(row_max, float("-inf")), row_max + torch.log(row_sum))
    batch, seqlen_q, nheads, _ = q.shape
    return _ungrouped(out).to(out_dtype), lse.reshape(batch, nheads, seqlen_q)


def _tile_rows(batch, nheads):
    """Query rows per tile: CHUNK, fewer when a (batch x nheads x rows x CHUNK) float32 tile would pass
    TILE_BYTES (a multiple of 16, at least 16)."""
    rows = TILE_BYTES // (max(1, batch * nheads) * CHUNK * 4)  # batch 0: any (there are no rows)
    return max(16, min(CHUNK, rows // 16 * 16))


def backward(dout, q, k, v, out, lse, scale, qpos: Positions, kpos: Positions, below, above, accumulate=None,
             softcap=None):
    """dq, dk, dv in the math dtype, recomputing P = exp(S - lse) tile by tile; with ``accumulate``
    (float32 dq, dk, dv) added into those and returned. With ``softcap`` (S = c tanh(s / c)) dS is scaled by
    the tanh's slope 1 - tanh^2, one more tile.

    Memory: besides the gradients, two tiles per call (P and dS, computed in place) and the float32 copies of
    one query chunk of q and dout and one key tile of k and v; with ``accumulate`` every tile's gradients go
    straight into (grouped views of) the accumulators, so no block-sized temporaries exist. The sums are those
    of ``total += block`` when a query chunk meets one key tile (a block of at most CHUNK keys); otherwise the
    same terms in tile order."""
    math = _math_dtype(q.dtype)
    batch, seqlen_q, nheads, headdim = q.shape
    nheads_kv, headdim_v = k.shape[2], v.shape[3]
    group = nheads // nheads_kv
    qg, dog, outg = (_grouped(x, nheads_kv) for x in (q, dout, out))  # views; cast chunk by chunk below
    kt, vt = (x.permute(0, 2, 1, 3) for x in (k, v))  # (B, Hkv, Lk, D) views
    lse = lse.to(math).reshape(batch, nheads_kv, group, seqlen_q, 1)
    # A row with lse = -inf saw no key: make every P entry exp(-inf) = 0 instead of NaN.
    lse = torch.where(lse == float("-inf"), torch.full_like(lse, float("inf")), lse)
    if accumulate is None:
        grads = tuple(torch.zeros(x.shape, dtype=math, device=q.device) for x in (q, k, v))
    else:
        grads = accumulate
    dq = _grouped(grads[0], nheads_kv)
    dk, dv = (g.permute(0, 2, 1, 3) for g in grads[1:])  # (B, Hkv, Lk, D) views of the results
    chunk = None
    for qs, ks, mask in _tiles(qpos, kpos, below, above, _tile_rows(batch, nheads)):
        if qs != chunk:  # a new query chunk: its float32 q, dout and delta = rowsum(dout * out)
            chunk, rows = qs, qs.stop - qs.start
            q_c, do_c = (x[..., qs, :].to(math).contiguous() for x in (qg, dog))  # (B, Hkv, G, rows, D)
            delta = (do_c * outg[..., qs, :].to(math)).sum(-1, keepdim=True)
            # the G query heads of a K/V head side by side: (B, Hkv, G * rows, D), one GEMM per tile product
            q_f = q_c.view(batch, nheads_kv, group * rows, headdim)
            do_f = do_c.view(batch, nheads_kv, group * rows, headdim_v)
        k_t, v_t = kt[..., ks, :].to(math), vt[..., ks, :].to(math)  # (B, Hkv, cols, D)
        probs = (q_f @ k_t.transpose(-1, -2)).mul_(scale)  # (B, Hkv, G * rows, cols)
        if softcap is not None:
            slope = torch.square(probs.div_(softcap).tanh_()).neg_().add_(1)  # 1 - tanh^2
            probs.mul_(softcap)
        tile = probs.view(batch, nheads_kv, group, rows, ks.stop - ks.start)
        if mask is not None:
            tile.masked_fill_(~mask.to(q.device), float("-inf"))
        tile.sub_(lse[..., qs, :]).exp_()  # P = exp(S - lse), in place of the scores
        dv[..., ks, :] += probs.transpose(-1, -2) @ do_f  # summed over the rows of every head of the group
        dscores = do_f @ v_t.transpose(-1, -2)  # dP
        dscores.view_as(tile).sub_(delta).mul_(tile).mul_(scale)  # dS = P (dP - delta) scale, in place
        if softcap is not None:
            dscores.mul_(slope)
            del slope
        del probs, tile
        dq[..., qs, :] += (dscores @ k_t).view(batch, nheads_kv, group, rows, headdim)
        dk[..., ks, :] += dscores.transpose(-1, -2) @ q_f
        del dscores  # before the next tile is made: two tiles at a time, not three
    return grads


def forward_varlen(q, k, v, scale, pairs, out, lse, accumulate=False, softcap=None):
    """Packed sequences (``PackedPair`` s), one after the other; writes into ``out`` (total_q, H, D)
    and ``lse`` (H, total_q), or with ``accumulate`` merges into the float32 values there."""
    for pair in pairs:
        rows, cols = pair.q_rows, pair.k_rows
        part_out, part_lse = forward(q[None, rows], k[None, cols], v[None, cols], scale, pair.q, pair.k,
                                     pair.below, pair.above, torch.float32 if accumulate else out.dtype,
                                     softcap=softcap)
        if accumulate:
            merge_(out[None, rows], lse[None, :, rows], part_out, part_lse)
        else:
            out[rows] = part_out[0]
            lse[:, rows] = part_lse[0]


def backward_varlen(dout, q, k, v, out, lse, scale, pairs, dq, dk, dv, accumulate=False, softcap=None):
    """Adds each packed sequence's gradients into dq, dk, dv (total, H, D), float32, through views of its rows
    (the sequences' rows do not overlap, so adding is also writing: ``accumulate`` changes nothing here)."""
    for pair in pairs:
        rows, cols = pair.q_rows, pair.k_rows
        backward(dout[None, rows], q[None, rows], k[None, cols], v[None, cols], out[None, rows], lse[None, :, rows],
                 scale, pair.q, pair.k, pair.below, pair.above, accumulate=(dq[None, rows], dk[None, cols],
                                                                             dv[None, cols]), softcap=softcap)
