"""Plain-PyTorch attention: the reference every kernel, ring and benchmark is checked against.

It materialises the full (seqlen_q x seqlen_k) score matrix, so use it on test-sized inputs only.
Math runs in float32, or float64 when the inputs are float64. The visibility rule is the one in
docs/design.md: key position ``kp`` is visible from query position ``qp`` when
``qp - left <= kp <= qp + right`` (``window=(left, right)``, ``None`` = unlimited) and, if ``causal``,
``kp <= qp``. Rows that see no key give output 0 and LSE -inf.

``softcap`` (Gemma 2, flash-attn): scores become ``softcap * tanh(scores / softcap)`` before the mask and the
softmax. ``sinks`` (gpt-oss): one logit per query head, a virtual key of value 0 that every row sees: it
enlarges the softmax denominator only (a row that sees no key gives output 0 and LSE = its sink).
"""

from __future__ import annotations

import torch

from .validation import check_causal, check_scale, check_sinks, check_softcap, check_window


def visibility_mask(q_positions, k_positions, causal, window):
    """Bool ``(seqlen_q, seqlen_k)``: True where the key is visible from the query."""
    diff = q_positions[:, None] - k_positions[None, :]  # qp - kp
    visible = torch.ones_like(diff, dtype=torch.bool)
    left, right = window if window is not None else (None, None)
    if causal:
        visible &= diff >= 0
    if left is not None:
        visible &= diff <= left
    if right is not None:
        visible &= diff >= -right
    return visible


def attention_reference(q, k, v, causal=False, softmax_scale=None, window=None,
                        q_positions=None, k_positions=None, softcap=None, sinks=None):
    """Differentiable full-matrix attention (also in ``sinks``).

    q: (batch, seqlen_q, nheads, headdim); k: (batch, seqlen_k, nheads_kv, headdim), v: (batch, seqlen_k,
    nheads_kv, headdim_v), with
    ``nheads % nheads_kv == 0`` (GQA/MQA: query head h reads KV head ``h // (nheads // nheads_kv)``).
    q_positions / k_positions: 1-D integer tensors of global positions (default ``arange``).
    Returns ``out`` (batch, seqlen_q, nheads, headdim_v) in the math dtype (float32 or float64) and
    ``lse`` (batch, nheads, seqlen_q), natural log, same dtype.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (batch, seqlen, nheads, headdim); got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[:3] != v.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k must be (batch, seqlen_k, nheads_kv, headdim_qk) and v (batch, seqlen_k, nheads_kv, "
                         f"headdim_v); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, seqlen_q, nheads, headdim = q.shape
    seqlen_k, nheads_kv = k.shape[1], k.shape[2]
    if nheads_kv == 0 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by nheads_kv ({nheads_kv}), the number of k/v heads")
    check_window(window)
    check_causal(causal)
    softcap = check_softcap(softcap)
    check_sinks(sinks, nheads, q)
    math_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = check_scale(softmax_scale, headdim)
    if q_positions is None:
        q_positions = torch.arange(seqlen_q, device=q.device)
    if k_positions is None:
        k_positions = torch.arange(seqlen_k, device=q.device)
    for name, positions, length in (("q_positions", q_positions, seqlen_q), ("k_positions", k_positions, seqlen_k)):
        if not isinstance(positions, torch.Tensor) or positions.shape != (length,):
            raise ValueError(f"{name} must be a 1-D tensor of {length} positions; got "
                             f"{tuple(positions.shape) if isinstance(positions, torch.Tensor) else positions!r}")
    visible = visibility_mask(q_positions.to(q.device, torch.long), k_positions.to(q.device, torch.long),
                              causal, window)

    group = nheads // nheads_kv
    qh = q.to(math_dtype).transpose(1, 2)  # (B, H, Lq, D)
    kh = k.to(math_dtype).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, Lk, D)
    vh = v.to(math_dtype).transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:  # the virtual key: one more column, of value 0
        sink_column = sinks.to(math_dtype).view(1, nheads, 1, 1).expand(batch, nheads, seqlen_q, 1)
        scores = torch.cat([scores, sink_column], dim=-1)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    unnormalised = torch.exp(scores - row_max)  # masked entries: exp(-inf) = 0
    row_sum = unnormalised.sum(dim=-1, keepdim=True)
    probs = unnormalised / torch.where(row_sum == 0, torch.ones_like(row_sum), row_sum)
    if sinks is not None:
        probs = probs[..., :seqlen_k]
    out = (probs @ vh).transpose(1, 2)
    lse = (row_max + torch.log(row_sum)).squeeze(-1)  # log(0) = -inf on fully masked rows
    return out, lse
