"""Helpers shared by the tests: float64 reference gradients, the low-precision baseline, ValueError messages."""

from __future__ import annotations

import torch

from dist_attn.kernels import attention_reference
from dist_attn.kernels.reference import visibility_mask


def reference_with_grads(q, k, v, dout, causal=False, window=None, q_positions=None, k_positions=None,
                         softmax_scale=None, softcap=None, sinks=None):
    """``attention_reference`` in float64 and its gradients for the output cotangent ``dout``:
    (out, lse, dq, dk, dv), and d sinks last when ``sinks`` are given."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    s64 = None if sinks is None else sinks.detach().double().requires_grad_()
    out, lse = attention_reference(q64, k64, v64, causal=causal, softmax_scale=softmax_scale, window=window,
                                   q_positions=q_positions, k_positions=k_positions, softcap=softcap, sinks=s64)
    out.backward(dout.double())
    grads = (q64.grad, k64.grad, v64.grad) + (() if sinks is None else (s64.grad,))
    return (out.detach(), lse.detach()) + grads


def attention_lowp(q, k, v, causal=False, window=None, softcap=None, sinks=None):
    """Plain PyTorch attention computed in the inputs' own (low) precision, the baseline of the
    "at most 2x PyTorch's own low-precision error" rule (flash-attn's tests); softcap and sinks as in
    gpt-oss's and Gemma 2's eager attention."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    visible = visibility_mask(torch.arange(q.shape[1]), torch.arange(k.shape[1]), causal, window)
    scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    if sinks is None:
        return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)
    sink_column = sinks.to(q.dtype).view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    return (probs @ vh).transpose(1, 2)


def max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def value_errors(calls):
    """{name: the ValueError message of calls[name](), or None when it raised none}."""
    messages = {}
    for name, call in calls.items():
        try:
            call()
            messages[name] = None
        except ValueError as error:
            messages[name] = str(error)
    return messages
