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
