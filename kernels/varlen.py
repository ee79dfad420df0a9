"""Packed variable-length sequences: many sequences in one ``(total_tokens, nheads, headdim)`` tensor.

Sequence i occupies rows ``cu_seqlens[i]:cu_seqlens[i + 1]``; no query attends to a key of another
sequence, and no padding is needed. Inside each sequence the masks are those of ``flash_attn_func``
(positions 0.. for queries and keys; causal aligned at the top-left when lengths differ).

The low-level calls (``flash_attn_varlen_forward`` / ``_backward``) take *spans* instead of
``cu_seqlens``: per sequence ``(start, length, offset)``, the rows it occupies and the global position
of its first row. That is what a ring step needs, where a rank's part of sequence i sits at some rows
and some positions of that sequence, and parts of a padded sequence are shorter than their slot. Rows
that no span covers are left alone: output 0, LSE -inf, gradients 0. Each backend runs all sequences
of a call at once (the Triton kernels in one launch per kernel).

``flash_attn_pairs_forward`` / ``_backward`` take the kernels' ``PackedPair`` s directly, which may share rows:
the pieces of a mask (``dist_attn.masks.slice_pairs``), merged into float32 accumulators.
"""

from __future__ import annotations

import torch

from .interface import _backend_module
from .merge import add_sinks_, sinks_grad
from .positions import PackedPair, Positions, mask_band, visible_range
from .validation import (check_accumulate, check_backend, check_causal, check_like, check_positions, check_qkv,
                         check_scale, check_sinks, check_softcap, check_window)


def check_cu_seqlens(name, cu_seqlens, total):
    """``cu_seqlens``: int32, 1-D, ``(batch + 1,)``, starting at 0, non-decreasing, ending at ``total``
    (unless ``total`` is None). Returns it as a Python list (one device-to-host copy)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32; got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name}.dtype must be torch.int32; got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with batch + 1 >= 2 entries; got shape {tuple(cu_seqlens.shape)}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"{name}[0] must be 0; got {bounds[0]}")
    decreasing = [i for i in range(1, len(bounds)) if bounds[i] < bounds[i - 1]]
    if decreasing:
        i = decreasing[0]
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths); "
                         f"{name}[{i}] = {bounds[i]} < {name}[{i - 1}] = {bounds[i - 1]}")
    if total is not None and bounds[-1] != total:
        raise ValueError(f"{name}[-1] must equal the number of packed tokens ({total}); got {bounds[-1]}")
    return bounds


def check_packed(q, k, v):
    """q: (total_q, nheads, headdim); k: (total_k, nheads_kv, headdim), v: (total_k, nheads_kv, headdim_v).
    Returns the dims of check_qkv."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must be 3-D (total_tokens, nheads, headdim) for packed sequences; "
                             f"got shape {tuple(t.shape)}")
    return check_qkv(*(t.unsqueeze(0) if isinstance(t, torch.Tensor) else t for t in (q, k, v)))


def _check_spans(name, spans, total, stride):
    """A list of ``(start, length, offset)`` ints, inside ``[0, total)`` and not overlapping."""
    if not isinstance(spans, (list, tuple)):
        raise TypeError(f"{name} must be a list of (start, length, offset) tuples; got {type(spans).__name__}")
    stride_name = name.replace("_spans", "_stride")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{stride_name} must be an int >= 1; got {stride!r}")
    checked = []
    for i, span in enumerate(spans):
        if (not isinstance(span, (list, tuple)) or len(span) != 3
                or any(isinstance(x, bool) or not isinstance(x, int) for x in span)):
            raise TypeError(f"{name}[{i}] must be a tuple (start, length, offset) of ints; got {span!r}")
        start, length, offset = span
        if start < 0 or length < 0 or start + length > total:
            raise ValueError(f"{name}[{i}] = {tuple(span)} must lie inside the {total} packed rows "
                             f"(start >= 0, length >= 0, start + length <= {total})")
        check_positions(f"{name}[{i}]", offset, stride, length)
        checked.append((start, length, offset))
    ordered = sorted(s for s in checked if s[1] > 0)
    for (a_start, a_len, _), (b_start, _, _) in zip(ordered, ordered[1:]):
        if a_start + a_len > b_start:
            raise ValueError(f"{name} must not overlap: rows starting at {a_start} ({a_len} rows) and at {b_start}")
    return checked


def packed_pairs(q_spans, k_spans, q_stride, k_stride, causal, window):
    """The ``PackedPair`` of every sequence whose queries see at least one of its keys."""
    pairs = []
    for (q_start, q_len, q_off), (k_start, k_len, k_off) in zip(q_spans, k_spans):
        if q_len == 0 or k_len == 0:
            continue
        qpos, kpos = Positions(q_off, q_stride, q_len), Positions(k_off, k_stride, k_len)
        below, above = mask_band(causal, window, qpos, kpos)
        start, end = visible_range(qpos.first, qpos.last, kpos, below, above)
        if end > start:
            pairs.append(PackedPair(q_start, qpos, k_start, kpos, below, above))
    return pairs


def _prepare(q, k, v, softmax_scale, causal, q_spans, k_spans, q_stride, k_stride, window, backend):
    dims = check_packed(q, k, v)
    scale = check_scale(softmax_scale, dims[-1])
    check_causal(causal)
    window = check_window(window)
    q_spans = _check_spans("q_spans", q_spans, q.shape[0], q_stride)
    k_spans = _check_spans("k_spans", k_spans, k.shape[0], k_stride)
    if len(q_spans) != len(k_spans):
        raise ValueError(f"q_spans and k_spans must describe the same sequences; got {len(q_spans)} and "
                         f"{len(k_spans)} spans")
    module = _backend_module(check_backend(backend, q.device), q.device)
    return dims, scale, packed_pairs(q_spans, k_spans, q_stride, k_stride, causal, window), module


def flash_attn_varlen_forward(q, k, v, softmax_scale, causal, q_spans, k_spans, q_stride=1, k_stride=1,
                              window=None, *, softcap=None, backend=None, out_dtype=None, accumulate=None):
    """Attention of packed sequences at explicit positions; sequence i is ``q_spans[i]`` against ``k_spans[i]``.

    q: (total_q, nheads, headdim); k: (total_k, nheads_kv, headdim), v: (total_k, nheads_kv, headdim_v). A span
    ``(start, length, offset)`` is ``length`` rows from row ``start``, row j at global position ``offset + j *
    stride``. Returns out (total_q, nheads, headdim_v) in ``out_dtype`` (default q.dtype) and lse (nheads, total_q),
    float32; rows outside every span, and rows that see no key, get out 0 and lse -inf. ``accumulate=(out, lse)``:
    float32 accumulators of those shapes to merge the result into, in place, as ``flash_attn_forward``
    does; they are returned.
    """
    (_, total_q, _, nheads, _, _), scale, pairs, module = _prepare(
        q, k, v, softmax_scale, causal, q_spans, k_spans, q_stride, k_stride, window, backend)
    softcap = check_softcap(softcap)
    out_shape = q.shape[:2] + v.shape[2:]
    accumulate = check_accumulate(accumulate, ("out", "lse"), q, (out_shape, (nheads, total_q)))
    if accumulate is not None:
        out, lse = accumulate
    else:
        out = torch.zeros(out_shape, dtype=q.dtype if out_dtype is None else out_dtype, device=q.device)
        lse = torch.full((nheads, total_q), float("-inf"), device=q.device)
    if pairs:
        module.forward_varlen(q, k, v, scale, pairs, out, lse, accumulate is not None, softcap=softcap)
    return out, lse


def flash_attn_varlen_backward(dout, q, k, v, out, lse, softmax_scale, causal, q_spans, k_spans, q_stride=1,
                               k_stride=1, window=None, *, softcap=None, backend=None, accumulate=None):
    """Gradients of ``flash_attn_varlen_forward`` given its output and the LSE to normalise with (in a
    ring, the global one). Returns dq, dk, dv in float32; rows outside every span get 0. With
    ``accumulate=(dq, dk, dv)`` (float32, shaped like q, k, v) the gradients are added into those."""
    (_, total_q, _, nheads, _, _), scale, pairs, module = _prepare(
        q, k, v, softmax_scale, causal, q_spans, k_spans, q_stride, k_stride, window, backend)
    softcap = check_softcap(softcap)
    out_shape = q.shape[:2] + v.shape[2:]
    check_like("dout", dout, q, out_shape)
    check_like("out", out, q, out_shape)
    check_like("lse", lse, q, (nheads, total_q), torch.float32)
    accumulate = check_accumulate(accumulate, ("dq", "dk", "dv"), q, (q.shape, k.shape, v.shape))
    if accumulate is not None:
        dq, dk, dv = accumulate
    else:
        dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float32, device=q.device) for t in (q, k, v))
    if pairs:
        module.backward_varlen(dout, q, k, v, out, lse, scale, pairs, dq, dk, dv, accumulate is not None,
                               softcap=softcap)
    return dq, dk, dv


def _spans(bounds):
    return [(start, end - start, 0) for start, end in zip(bounds, bounds[1:])]


class FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, q_spans, k_spans, causal, softmax_scale, window, backend, softcap, sinks):
        args = dict(window=window, softcap=softcap, backend=backend)
        out_dtype = q.dtype if sinks is None else torch.float32
        out, lse = flash_attn_varlen_forward(q, k, v, softmax_scale, causal, q_spans, k_spans, out_dtype=out_dtype,
                                             **args)
        if sinks is not None:
            add_sinks_(out[None], lse[None], sinks)
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (q_spans, k_spans, causal, softmax_scale, args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        q_spans, k_spans, causal, softmax_scale, args = ctx.args
        dq, dk, dv = flash_attn_varlen_backward(dout, q, k, v, out, lse, softmax_scale, causal, q_spans, k_spans,
                                                **args)
        dsinks = None if sinks is None else sinks_grad(sinks, lse[None], out[None], dout[None])
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, dsinks


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k=None, causal=False, softmax_scale=None,
                           window=None, return_lse=False, backend=None, *, softcap=None, sinks=None):
    """Differentiable attention over packed variable-length sequences (flash-attn's varlen layout).

    q: (total_q, nheads, headdim); k: (total_k, nheads_kv, headdim), v: (total_k, nheads_kv, headdim_v);
    ``cu_seqlens_q`` (int32,
    ``(batch + 1,)``) gives sequence i the query rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``, and
    ``cu_seqlens_k`` (default: ``cu_seqlens_q``) its key rows. Tokens never attend across sequences.
    Within a sequence positions start at 0 for queries and keys; ``causal`` and ``window`` act on them.
    ``softcap`` and ``sinks`` as in ``flash_attn_func`` (every row of every sequence sees its head's sink).
    Returns out (like q) and, with ``return_lse=True``, lse (nheads, total_q), float32, not differentiable.
    """
    check_packed(q, k, v)
    check_sinks(sinks, q.shape[1], q)
    q_bounds = check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0])
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"cu_seqlens_k is required when k has a different number of tokens ({k.shape[0]}) "
                             f"than q ({q.shape[0]})")
        k_bounds = q_bounds
    else:
        k_bounds = check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0])
    if len(k_bounds) != len(q_bounds):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same number of sequences; got "
                         f"{len(q_bounds) - 1} and {len(k_bounds) - 1}")
    out, lse = FlashAttnVarlenFunc.apply(q, k, v, _spans(q_bounds), _spans(k_bounds), causal, softmax_scale,
                                         window, backend, softcap, sinks)
    return (out, lse) if return_lse else out


def _check_pairs(pairs, total_q, total_k):
    if not isinstance(pairs, (list, tuple)) or not all(isinstance(p, PackedPair) for p in pairs):
        raise TypeError("pairs must be a list of dist_attn.kernels.positions.PackedPair")
    for i, p in enumerate(pairs):
        if (min(p.q_start, p.k_start, p.q.length, p.k.length) < 0 or p.q_start + p.q.length > total_q
                or p.k_start + p.k.length > total_k):
            raise ValueError(f"pairs[{i}] = {p} must lie inside the {total_q} query and {total_k} key rows")
    return [p for p in pairs if p.q.length and p.k.length]


def flash_attn_pairs_forward(q, k, v, softmax_scale, pairs, out, lse, *, softcap=None, backend=None):
    """Attention over explicit ``PackedPair`` s, merged into float32 accumulators, for masks made of slices.

    Each pair is (query rows at positions, key rows at positions, band); unlike ``flash_attn_varlen_forward``'s
    sequences, pairs may share query or key rows (a query range that several mask slices reach: a prefix-LM
    document's causal part sees its prefix and itself). Every pair is merged into ``out`` (total_q, nheads,
    headdim_v) and ``lse`` (nheads, total_q), float32, in place with the online-softmax rule; the Triton backend
    runs all pairs in one launch. A pair must not repeat a (query, key) position pair that another pair covers.
    Returns (out, lse)."""
    _, total_q, _, nheads, _, headdim = check_packed(q, k, v)
    scale = check_scale(softmax_scale, headdim)
    softcap = check_softcap(softcap)
    check_accumulate((out, lse), ("out", "lse"), q, (q.shape[:2] + v.shape[2:], (nheads, total_q)))
    pairs = _check_pairs(pairs, total_q, k.shape[0])
    if pairs:
        _backend_module(check_backend(backend, q.device), q.device).forward_varlen(q, k, v, scale, pairs, out, lse,
                                                                                   True, softcap=softcap)
    return out, lse


def flash_attn_pairs_backward(dout, q, k, v, out, lse, softmax_scale, pairs, dq, dk, dv, *, softcap=None,
                              backend=None):
    """Gradients of ``flash_attn_pairs_forward`` given the output and the LSE of all pairs (a ring's global
    one), added into the float32 ``dq``, ``dk``, ``dv`` (shaped like q, k, v) in place; returns them."""
    _, total_q, _, nheads, _, headdim = check_packed(q, k, v)
    scale = check_scale(softmax_scale, headdim)
    softcap = check_softcap(softcap)
    out_shape = q.shape[:2] + v.shape[2:]
    check_like("dout", dout, q, out_shape)
    check_like("out", out, q, out_shape)
    check_like("lse", lse, q, (nheads, total_q), torch.float32)
    check_accumulate((dq, dk, dv), ("dq", "dk", "dv"), q, (q.shape, k.shape, v.shape))
    pairs = _check_pairs(pairs, total_q, k.shape[0])
    if pairs:
        _backend_module(check_backend(backend, q.device), q.device).backward_varlen(
            dout, q, k, v, out, lse, scale, pairs, dq, dk, dv, True, softcap=softcap)
    return dq, dk, dv
