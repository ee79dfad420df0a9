"""Activation checkpointing that does not run the ring twice: ``checkpoint_layer`` and ``checkpoint``.

Plain activation checkpointing recomputes a layer's forward in the backward, and for a sequence-parallel layer
that recompute includes the whole ring forward of its attention: a second round of K/V messages per layer and
the attention FLOPs again. Here the attention output and LSE of the first forward are kept (for a rank holding L
tokens: the size of one activation, L x heads x headdim, plus L x heads float32 for the LSE), and in the
recompute every ``ring_attention`` call of the layer returns them instead of running its ring; the backward ring
then uses them exactly as an uncheckpointed layer would. So the gradients are bit-identical to the
uncheckpointed layer's, and a checkpointed layer's forward + backward sends the same ring messages as an
uncheckpointed one. Everything else of the layer (projections, MLP, norms, Ulysses all-to-alls) is recomputed
as usual, with torch's non-reentrant ``torch.utils.checkpoint.checkpoint``.
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

_state = threading.local()  # .cache: the _AttentionCache of the checkpointed call running now, if any


class _AttentionCache:
    """The (out, lse) of every ring_attention call of one checkpointed call, in call order."""

    def __init__(self):
        self.saved = []
        self.calls = 0  # how many times the checkpointed function has run: 1 = the forward, then recomputes

    def run(self, function, args, kwargs):
        outer = getattr(_state, "cache", None)
        self.calls += 1
        self.position = 0
        _state.cache = self
        try:
            return function(*args, **kwargs)
        finally:
            _state.cache = outer

    @property
    def replaying(self):
        return self.calls > 1

    def record(self, out, lse):
        self.saved.append((out.detach(), lse.detach()))

    def replay(self, shape):
        """The next recorded (out, lse); ``shape``: the output shape this call expects."""
        if self.position >= len(self.saved):
            raise RuntimeError(f"dist_attn.checkpoint: the recompute made more ring_attention calls than the forward "
                               f"({len(self.saved)}); the checkpointed function must call ring_attention the same way "
                               f"every time")
        out, lse = self.saved[self.position]
        if out.shape != shape:
            raise RuntimeError(f"dist_attn.checkpoint: ring_attention call {self.position} of the recompute makes an "
                               f"output of shape {tuple(shape)}, the forward made {tuple(out.shape)}")
        self.position += 1
        return out.detach(), lse


def active_cache():
    """The cache of the checkpointed call running in this thread, or None (ring.py asks at every call)."""
    return getattr(_state, "cache", None)


def checkpoint(function, *args, **kwargs):
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)``, except that the
    recompute in the backward does not run the ring forward of ``function``'s ``ring_attention`` calls: it takes
    their output and LSE from the forward. Without grad mode it just calls ``function``. The signature of
    ``torch.utils.checkpoint.checkpoint``; Hugging Face's ``gradient_checkpointing`` can take it as its function
    (``dist_attn.integrations.hf.gradient_checkpointing_enable``)."""
    use_reentrant = kwargs.pop("use_reentrant", False)
    if use_reentrant:
        raise ValueError("dist_attn.checkpoint: use_reentrant=True is not supported (the reentrant variant "
                         "recomputes in a separate backward pass); pass use_reentrant=False or leave it out")
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    checkpoint_options = {name: kwargs.pop(name) for name in ("preserve_rng_state", "determinism_check", "debug",
                                                              "context_fn") if name in kwargs}
    cache = _AttentionCache()
    return _torch_checkpoint(cache.run, function, args, kwargs, use_reentrant=False, **checkpoint_options)


def checkpoint_layer(layer: torch.nn.Module) -> torch.nn.Module:
    """Makes ``layer`` (e.g. a transformer block) run its forward under ``dist_attn.checkpoint``: activations are
    recomputed in the backward, its ring attention is not. Returns ``layer`` itself (the same parameters and
    state-dict keys; its ``forward`` attribute is replaced), e.g. ``for b in model.blocks: checkpoint_layer(b)``.
    Calling it twice on one layer is an error."""
    if not isinstance(layer, torch.nn.Module):
        raise TypeError(f"checkpoint_layer: layer must be a torch.nn.Module; got {type(layer).__name__}")
    if getattr(layer.forward, "_dist_attn_checkpointed", False):
        raise ValueError(f"checkpoint_layer: this {type(layer).__name__} is already checkpointed")
    if "forward" in vars(layer):  # an instance-level forward (another wrapper): keep calling it
        forward, owner = vars(layer)["forward"], None
    else:  # the class's forward, with the layer held weakly: no reference cycle layer -> forward -> layer
        forward, owner = type(layer).forward, weakref.ref(layer)

    def checkpointed_forward(*args, **kwargs):
        if owner is None:
            return checkpoint(forward, *args, **kwargs)
        return checkpoint(forward, owner(), *args, **kwargs)

    checkpointed_forward._dist_attn_checkpointed = True
    layer.forward = checkpointed_forward
    return layer
