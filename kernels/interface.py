"""Public entry points of the single-device kernel (the contract in docs/design.md).

Three layers, as in flash-attn: ``flash_attn_forward`` / ``flash_attn_backward`` validate and dispatch
to a backend (Triton kernels or the chunked PyTorch path); ``FlashAttnFunc`` is the autograd
Function; ``flash_attn_func`` is the user-facing call.

Layout ``(batch, seqlen, nheads, headdim)``; k and v may have fewer heads (GQA/MQA) and v its own head dim
(``headdim_v``, MLA: q/k 192, v 128). The causal mask
for positions 0..4 (rows: queries, columns: keys, 1 = visible)::

    1 0 0 0 0
    1 1 0 0 0
    1 1 1 0 0
    1 1 1 1 0
    1 1 1 1 1

``window=(left, right)`` keeps ``q_pos - left <= k_pos <= q_pos + right`` on top of that. ``softcap``
(Gemma 2) caps the scores as ``softcap * tanh(scores / softcap)`` inside the kernels, forward and backward.
``sinks`` (gpt-oss; ``flash_attn_func``) enter once, in the final LSE (``merge.add_sinks_``), and get their
gradient from the LSE and delta (``merge.sinks_grad``): the block-level entry points do not take them, since
a ring adds them once after its last step.
"""

from __future__ import annotations

import torch

from . import torch_backend
from .positions import Positions, mask_band
from .merge import add_sinks_, sinks_grad
from .validation import (check_accumulate, check_backend, check_causal, check_like, check_positions, check_qkv,
                         check_scale, check_sinks, check_softcap, check_window)


def _backend_module(name, device):
    if name == "torch":
        return torch_backend
    from . import triton_attention  # imported lazily: the torch backend works without a usable Triton
    if device.type != "cuda" and not triton_attention.INTERPRET:
        raise ValueError(f"backend='triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1 set "
                         "before the first import of dist_attn.kernels; use backend='torch' on CPU")
    return triton_attention


def _prepare(q, k, v, softmax_scale, causal, q_offset, k_offset, q_stride, k_stride, window, backend):
    """Validates everything but softcap once; returns (dims, scale, q positions, k positions, band, backend
    module)."""
    dims = check_qkv(q, k, v)
    _, seqlen_q, seqlen_k, _, _, headdim = dims
    scale = check_scale(softmax_scale, headdim)
    check_causal(causal)
    window = check_window(window)
    check_positions("q", q_offset, q_stride, seqlen_q)
    check_positions("k", k_offset, k_stride, seqlen_k)
    qpos = Positions(q_offset, q_stride, seqlen_q)
    kpos = Positions(k_offset, k_stride, seqlen_k)
    below, above = mask_band(causal, window, qpos, kpos)
    module = _backend_module(check_backend(backend, q.device), q.device)
    return dims, scale, qpos, kpos, (below, above), module


def flash_attn_forward(q, k, v, softmax_scale, causal, q_offset=0, k_offset=0, q_stride=1, k_stride=1,
                       window=None, *, softcap=None, backend=None, out_dtype=None, accumulate=None):
    """Attention of one query block against one key/value block at explicit global positions.

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_kv, headdim); v: (batch, seqlen_k,
    nheads_kv, headdim_v). Query row i sits at ``q_offset + i * q_stride``, key row j at ``k_offset + j *
    k_stride``. Returns ``out`` (batch, seqlen_q, nheads, headdim_v) in ``out_dtype`` (default q.dtype; the ring asks
    for float32 so it can merge steps without rounding) and ``lse`` (batch, nheads, seqlen_q), float32,
    natural log. Rows that see no key: out 0, lse -inf.

    ``accumulate=(out, lse)``: float32 accumulators of earlier key blocks (out like q, lse
    (batch, nheads, seqlen_q); a row no block reached yet holds 0 and -inf). This block is merged into
    them in place with the online-softmax rule (``dist_attn.kernels.merge``) and they are returned; the Triton
    kernel does it in its epilogue, without a separate pass over them. ``out_dtype`` is then ignored.
    """
    (batch, seqlen_q, seqlen_k, nheads, _, _), scale, qpos, kpos, band, module = _prepare(
        q, k, v, softmax_scale, causal, q_offset, k_offset, q_stride, k_stride, window, backend)
    softcap = check_softcap(softcap)
    out_shape = q.shape[:3] + v.shape[3:]
    accumulate = check_accumulate(accumulate, ("out", "lse"), q, (out_shape, (batch, nheads, seqlen_q)))
    out_dtype = q.dtype if out_dtype is None else out_dtype
    if seqlen_q == 0 or seqlen_k == 0:
        if accumulate is not None:
            return accumulate
        out = torch.zeros(out_shape, dtype=out_dtype, device=q.device)
        return out, torch.full((batch, nheads, seqlen_q), float("-inf"), device=q.device)
    out, lse = module.forward(q, k, v, scale, qpos, kpos, *band, out_dtype, accumulate, softcap=softcap)
    return (out, lse) if accumulate is not None else (out, lse.float())


def flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, q_offset=0, k_offset=0, q_stride=1,
                        k_stride=1, window=None, *, softcap=None, backend=None, accumulate=None):
    """Gradients of attention given the output and the LSE it was normalised with.

    ``lse`` is used as given, not recomputed: in a ring it is the global LSE over all KV blocks, so
    the gradients of this block are exact without any merge. Returns ``dq, dk, dv`` in float32 (for
    accumulation across ring steps), with the shapes of q, k, v. ``accumulate=(dq, dk, dv)``: float32
    tensors shaped like q, k, v to add this block's gradients into, in place (the Triton kernels add
    in their epilogue); they are returned.
    """
    (batch, seqlen_q, seqlen_k, nheads, _, _), scale, qpos, kpos, band, module = _prepare(
        q, k, v, softmax_scale, causal, q_offset, k_offset, q_stride, k_stride, window, backend)
    softcap = check_softcap(softcap)
    out_shape = q.shape[:3] + v.shape[3:]
    check_like("dout", dout, q, out_shape)
    check_like("out", out, q, out_shape)
    check_like("lse", lse, q, (batch, nheads, seqlen_q), torch.float32)
    accumulate = check_accumulate(accumulate, ("dq", "dk", "dv"), q, (q.shape, k.shape, v.shape))
    if seqlen_q == 0 or seqlen_k == 0:
        if accumulate is not None:
            return accumulate
        return (torch.zeros(q.shape, dtype=torch.float32, device=q.device),
                torch.zeros(k.shape, dtype=torch.float32, device=q.device),
                torch.zeros(v.shape, dtype=torch.float32, device=q.device))
    grads = module.backward(dout, q, k, v, out, lse, scale, qpos, kpos, *band, accumulate, softcap=softcap)
    return grads if accumulate is not None else tuple(grad.float() for grad in grads)


class FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, window, backend, softcap, sinks):
        args = dict(window=window, softcap=softcap, backend=backend)
        if sinks is None:
            out, lse = flash_attn_forward(q, k, v, softmax_scale, causal, **args)
        else:
            out, lse = flash_attn_forward(q, k, v, softmax_scale, causal, out_dtype=torch.float32, **args)
            add_sinks_(out, lse, sinks)
            out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.args = (softmax_scale, causal, args)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        softmax_scale, causal, args = ctx.args
        dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, softmax_scale, causal, **args)
        dsinks = None if sinks is None else sinks_grad(sinks, lse, out, dout)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, dsinks


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, window=None, return_lse=False, backend=None, *,
                    softcap=None, sinks=None):
    """Differentiable exact attention; flash-attn layout and semantics.

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_kv, headdim), v: (batch, seqlen_k,
    nheads_kv, headdim_v) with ``nheads % nheads_kv == 0``; float16, bfloat16 or float32; head dims <= 256.
    Positions are 0..seqlen-1 for both (use ``flash_attn_forward`` for offsets and strides); with
    ``seqlen_q != seqlen_k`` the causal mask is aligned at the top-left (query i sees keys <= i).
    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` (None or 0: off). ``sinks``: (nheads,)
    learnable logits, a virtual key of value 0 per head (differentiable).
    ``backend``: "triton" (default on CUDA) or "torch" (default elsewhere).
    Returns ``out`` (batch, seqlen_q, nheads, headdim_v), and with ``return_lse=True`` also ``lse`` (batch,
    nheads, seqlen_q), float32, which is not differentiable.
    """
    if sinks is not None:
        check_qkv(q, k, v)
        check_sinks(sinks, q.shape[2], q)
    out, lse = FlashAttnFunc.apply(q, k, v, causal, softmax_scale, window, backend, softcap, sinks)
    return (out, lse) if return_lse else out
