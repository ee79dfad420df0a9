"""Argument checks shared by every public kernel entry point.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value or
shape) with a message that names the argument and says what was expected.
"""

from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEADDIM = 256
BACKENDS = ("triton", "torch")
# Positions are int32 inside the Triton kernels.
MAX_POSITION = 2**31 - 1


def check_window(window):
    """``None`` or a pair ``(left, right)`` of ints >= 0 or ``None``; returns it as a tuple."""
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"window must be None or a pair (left, right) of ints >= 0 or None; got {window!r}")
    for side, value in zip(("left", "right"), window):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"window {side} must be an int >= 0 or None; got {value!r} in window={window!r}")
    return tuple(window)


def check_causal(causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool; got {type(causal).__name__}")


def check_qkv(q, k, v):
    """Shapes, dtypes and devices of q, k, v in the flash-attn layout; returns the dimensions, ``headdim`` being
    the head dim of q and k (v's, ``headdim_v = v.shape[-1]``, may differ: MLA)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, seqlen, nheads, headdim); got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype must be one of float16, bfloat16, float32; got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype; got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got q={q.device}, k={k.device}, v={v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must have the same (batch, seqlen, nheads_kv); got k={tuple(k.shape)}, "
                         f"v={tuple(v.shape)}")
    batch, seqlen_q, nheads, headdim = q.shape
    _, seqlen_k, nheads_kv, headdim_k = k.shape
    headdim_v = v.shape[3]
    if k.shape[0] != batch:
        raise ValueError(f"k batch size must equal q's ({batch}); got {k.shape[0]}")
    if headdim_k != headdim:
        raise ValueError(f"k head dim must equal q's (headdim_qk = {headdim}); got {headdim_k} (v may differ: "
                         f"headdim_v = {headdim_v})")
    for name, dim in (("headdim_qk", headdim), ("headdim_v", headdim_v)):
        if not 1 <= dim <= MAX_HEADDIM:
            raise ValueError(f"{name} must be between 1 and {MAX_HEADDIM}; got headdim_qk = {headdim}, "
                             f"headdim_v = {headdim_v}")
    if nheads_kv == 0 or nheads % nheads_kv != 0:
        raise ValueError(f"nheads ({nheads}) must be divisible by nheads_kv ({nheads_kv}), the number of k/v heads")
    return batch, seqlen_q, seqlen_k, nheads, nheads_kv, headdim


def check_softcap(softcap):
    """Returns the logit softcap as a float, or None for none (``None`` or 0, flash-attn's "off")."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float or None; got {type(softcap).__name__}")
    if softcap == 0:
        return None
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be a positive finite number (0 or None: no softcap); got {softcap}")
    return float(softcap)


def check_sinks(sinks, nheads, reference):
    """``sinks``: None, or a floating 1-D tensor of one logit per query head on ``reference``'s device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor of shape ({nheads},) or None; got {type(sinks).__name__}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks.dtype must be a floating dtype; got {sinks.dtype}")
    if tuple(sinks.shape) != (nheads,):
        raise ValueError(f"sinks must have shape (nheads,) = ({nheads},), one logit per query head; got "
                         f"{tuple(sinks.shape)}")
    if sinks.device != reference.device:
        raise ValueError(f"sinks must be on {reference.device}; got {sinks.device}")
    return sinks


def check_like(name, tensor, reference, shape, dtype=None):
    """``tensor`` is a tensor of ``shape`` (and ``dtype``) on ``reference``'s device."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(tensor).__name__}")
    if tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(tensor.shape)}")
    if dtype is not None and tensor.dtype != dtype:
        raise TypeError(f"{name}.dtype must be {dtype}; got {tensor.dtype}")
    if tensor.device != reference.device:
        raise ValueError(f"{name} must be on {reference.device}; got {tensor.device}")


def check_accumulate(accumulate, names, reference, shapes):
    """``accumulate``: None, or a tuple of float32 tensors (one per name) shaped like ``shapes``, on the
    device of ``reference``. Returns it as a tuple (or None)."""
    if accumulate is None:
        return None
    if not isinstance(accumulate, (tuple, list)) or len(accumulate) != len(names):
        raise TypeError(f"accumulate must be None or a tuple ({', '.join(names)}) of float32 tensors; "
                        f"got {type(accumulate).__name__}")
    for name, tensor, shape in zip(names, accumulate, shapes):
        check_like(f"accumulate {name}", tensor, reference, shape, torch.float32)
    return tuple(accumulate)


def check_scale(softmax_scale, headdim):
    """Returns the softmax scale: ``headdim ** -0.5`` for ``None``, else a positive finite float."""
    if softmax_scale is None:
        return headdim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None; got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a positive finite number; got {softmax_scale}")
    return float(softmax_scale)


def check_positions(name, offset, stride, length):
    """``offset`` any int, ``stride`` an int >= 1, and every position fits in int32."""
    if isinstance(offset, bool) or not isinstance(offset, int):
        raise TypeError(f"{name}_offset must be an int; got {type(offset).__name__}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"{name}_stride must be an int >= 1; got {stride!r}")
    last = offset + max(length - 1, 0) * stride
    if abs(offset) > MAX_POSITION or abs(last) > MAX_POSITION:
        raise ValueError(f"{name} positions must fit in int32; {name}_offset={offset}, {name}_stride={stride} "
                         f"and length {length} reach {last}")


def check_backend(backend, device):
    """Resolves ``backend=None`` to Triton on CUDA and torch elsewhere."""
    if backend is None:
        return "triton" if device.type == "cuda" else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None; got {backend!r}")
    return backend
