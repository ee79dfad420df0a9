"""Boolean matrices written out from each mask's definition (independent of the slice code in
``dist_attn.masks``), and float64 attention under such a matrix, with gradients."""

from __future__ import annotations

import torch


def grid(n):
    return torch.arange(n)[:, None], torch.arange(n)[None, :]  # query positions (rows), key positions (columns)


def doc_ids(bounds):
    return torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())


def expected_documents(bounds, causal, window):
    qp, kp = grid(bounds[-1])
    ids = doc_ids(bounds)
    visible = ids[:, None] == ids[None, :]
    if causal:
        visible &= kp <= qp
    if window is not None:
        left, right = window
        visible &= kp >= qp - left if left is not None else True
        visible &= kp <= qp + right if right is not None else True
    return visible


def expected_prefix_lm(prefix_lens, bounds):
    qp, kp = grid(bounds[-1])
    ids = doc_ids(bounds)
    starts = torch.tensor(bounds[:-1])[ids]
    in_prefix = torch.arange(bounds[-1]) - starts < torch.tensor(prefix_lens)[ids]
    same = ids[:, None] == ids[None, :]
    return same & ((kp <= qp) | (in_prefix[:, None] & in_prefix[None, :]))


def expected_shared_prompt(prompt, responses):
    n = prompt + sum(responses)
    qp, kp = grid(n)
    owner = torch.cat([torch.full((prompt,), -1), *(torch.full((r,), i) for i, r in enumerate(responses))])
    prompt_rows = owner[:, None] < 0
    return torch.where(prompt_rows, kp <= qp, (owner[None, :] < 0) | ((owner[:, None] == owner[None, :]) & (kp <= qp)))


def expected_block_sparse(block_mask, block_size, n):
    qp, kp = grid(n)
    return block_mask[qp // block_size, kp // block_size]


def dense_attention_with_grads(q, k, v, dout, visible, softcap=None, sinks=None):
    """float64 attention of (batch, seqlen, heads, dim) q, k, v under the boolean (seqlen_q, seqlen_k) matrix
    ``visible`` (GQA by repeating K/V heads), and its gradients: (out, lse (batch, heads, seqlen), dq, dk, dv) and
    d sinks last with ``sinks``. Rows that see no key (and no sink) give 0 and lse -inf."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s64 = None if sinks is None else sinks.detach().double().requires_grad_()
    group = q.shape[2] // k.shape[2]
    kh, vh = (x.repeat_interleave(group, dim=2) for x in (k64, v64))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, kh) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if s64 is not None:
        scores = torch.cat([scores, s64.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    if s64 is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhqk,bkhd->bqhd", probs, vh)
    out.backward(dout.double())
    grads = (q64.grad, k64.grad, v64.grad) + (() if sinks is None else (s64.grad,))
    return (out.detach(), lse.detach()) + grads
