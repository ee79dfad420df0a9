"""The online-softmax merge of partial attention results.

Two partials over disjoint key sets, (out_a, lse_a) and (out_b, lse_b), combine exactly as
``lse = logaddexp(lse_a, lse_b)`` and ``out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)``.
Everything is float32; a side with lse = -inf (its keys were all masked) gets weight 0, and when both
are -inf the row stays 0 with lse -inf instead of becoming NaN.

The Triton forward applies the same rule in its epilogue (``accumulate=`` of ``flash_attn_forward``), so a
ring step makes no separate pass over the float32 accumulators; the torch backend calls ``merge_``.
"""

from __future__ import annotations

import torch


def merge_(out, lse, block_out, block_lse):
    """Merges (block_out, block_lse) into the accumulators (out, lse) in place.

    out, block_out: (batch, seqlen, nheads, headdim) float32; lse, block_lse: (batch, nheads, seqlen) float32.
    """
    new_lse = torch.logaddexp(lse, block_lse)
    finite = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)  # no (-inf) - (-inf)
    old_weight = torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1)  # (batch, seqlen, nheads, 1)
    new_weight = torch.exp(block_lse - finite).transpose(1, 2).unsqueeze(-1)
    out.mul_(old_weight).add_(block_out * new_weight)
    lse.copy_(new_lse)


# Attention sinks (gpt-oss): a learned logit per query head, a virtual key with value 0. It only enlarges the
# softmax denominator, so it enters once, in the final LSE: lse' = logaddexp(lse, sink), out' = out *
# exp(lse - lse'). Applied after all key blocks (in a ring: after the last step), not once per block, it
# needs no kernel of its own; the backward kernels then use lse' as given, which is exact.

def add_sinks_(out, lse, sinks):
    """Merges the sinks into the final (out, lse) in place. out: (batch, seqlen, nheads, headdim_v) float32,
    lse: (batch, nheads, seqlen) float32, sinks: (nheads,). A row that saw no key keeps out 0 and gets
    lse = its sink."""
    sink = sinks.detach().float().view(1, -1, 1)
    new_lse = torch.logaddexp(lse, sink)
    finite = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    out.mul_(torch.exp(lse - finite).transpose(1, 2).unsqueeze(-1))
    lse.copy_(new_lse)


ROW_CHUNK = 4096  # rows of dout * out in float32 at a time


def sinks_grad(sinks, lse, out, dout):
    """d loss / d sinks = -sum over batch and rows of exp(sink_h - lse') * delta, with delta =
    rowsum(dout * out) and lse' the LSE with the sinks in (``add_sinks_``). Float32 (nheads,), cast to
    sinks.dtype; rows are reduced ``ROW_CHUNK`` at a time so no float32 copy of out exists."""
    total = torch.zeros(lse.shape[1], dtype=torch.float32, device=lse.device)
    sink = sinks.detach().float().view(1, -1, 1)
    for start in range(0, out.shape[1], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        delta = (dout[:, rows].float() * out[:, rows].float()).sum(-1).transpose(1, 2)  # (batch, nheads, rows)
        finite = torch.where(torch.isinf(lse[:, :, rows]), torch.zeros_like(lse[:, :, rows]), lse[:, :, rows])
        weight = torch.where(torch.isinf(lse[:, :, rows]), 0.0, torch.exp(sink - finite))  # -inf sink, empty row
        total -= (weight * delta).sum((0, 2))
    return total.to(sinks.dtype)
