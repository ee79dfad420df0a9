"""Helpers shared by the tests: float64 reference gradients, the low-precision baseline, ValueError messages."""

from __future__ import annotations

import torch

from dist_attn.kernels import attention_reference
from dist_attn.kernels.reference import visibility_mask


def reference_with_grads(q, k, v, dout, causal=False, window=None, q_positions=None, k_positions=None,
                         softmax_scale=None):
    """``attention_reference`` in float64 and its gradients for the output cotangent ``dout``."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(q64, k64, v64, causal=causal, softmax_scale=softmax_scale, window=window,
                                   q_positions=q_positions, k_positions=k_positions)
    out.backward(dout.double())
    return out.detach(), lse.detach(), q64.grad, k64.grad, v64.grad


def attention_lowp(q, k, v, causal=False, window=None):
    """Plain PyTorch attention computed in the inputs' own (low) precision, the baseline of the
    "at most 2x PyTorch's own low-precision error" rule (flash-attn's tests)."""
    group = q.shape[2] // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(group, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(group, dim=1)
    scores = (qh @ kh.transpose(-1, -2)) * q.shape[-1] ** -0.5
    visible = visibility_mask(torch.arange(q.shape[1]), torch.arange(k.shape[1]), causal, window)
    scores = scores.masked_fill(~visible.to(q.device), float("-inf"))
    return (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2)


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
