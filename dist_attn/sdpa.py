"""``context_parallel``: run a model that calls PyTorch SDPA on a sequence sharded across ranks, unchanged.

    with dist_attn.context_parallel(group=sp_group, layout="zigzag"):
        loss = model(ids_local, positions_local).loss     # every F.scaled_dot_product_attention -> ring

Inside the block, every ``torch.nn.functional.scaled_dot_product_attention(q, k, v, ...)`` call (also one
bound before the block, e.g. ``from torch.nn.functional import scaled_dot_product_attention``: calls are
caught by a ``TorchFunctionMode``, as PyTorch's own ``context_parallel`` does) on this rank's shard of the
sequence runs ``dist_attn.ring_attention`` over ``group`` instead: q and k (B, H or H_kv, S_local, D), v
(B, H_kv, S_local, Ev) as ``dist_attn.shard(x, layout, rank, world_size, dim=2)`` places them; the output is
this rank's shard, (B, H, S_local, Ev). ``is_causal`` is causal attention on global positions, ``scale`` the
softmax scale, ``enable_gqa=True`` lets fewer K/V heads through without repeating them (PyTorch's rule: H a
multiple of H_kv). Anything that would not be exact across shards is refused with a ValueError naming it:
an ``attn_mask`` (a mask of local shape says nothing about global positions; use ``is_causal``, or
``ring_attention``'s ``window``), ``dropout_p`` > 0, different query and key lengths (cross-attention), and
other than 4-D inputs. The model must rotate (RoPE) by global positions (``dist_attn.global_positions``).

Compared with PyTorch's ``torch.distributed.tensor.experimental.context_parallel``: the same drop-in use,
with dist-attn's kernel, layouts (zigzag/striped balance causal work), GQA without repeated K/V and float32
accumulation across ring steps.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dist_attn.comm import as_group
from dist_attn.layouts import check_layout
from dist_attn.ring import ring_attention


def _ring_sdpa(options, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
               enable_gqa=False):
    if attn_mask is not None:
        raise ValueError("scaled_dot_product_attention under dist_attn.context_parallel: attn_mask is not supported "
                         "(a mask of the local shard's shape has no global positions); pass is_causal=True, or call "
                         "dist_attn.ring_attention with window=. Hugging Face models build such a mask from the "
                         "global position_ids: use attn_implementation=dist_attn.integrations.hf.register() instead")
    if dropout_p != 0.0:
        raise ValueError(f"scaled_dot_product_attention under dist_attn.context_parallel: dropout_p must be 0; got "
                         f"{dropout_p!r} (attention dropout is not supported)")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"scaled_dot_product_attention under dist_attn.context_parallel takes 4-D (batch, heads, "
                         f"seq, headdim) query, key and value; got {query.dim()}-D, {key.dim()}-D, {value.dim()}-D")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"scaled_dot_product_attention under dist_attn.context_parallel: query and key must be "
                         f"shards of the same sequence; got lengths {query.shape[2]} and {key.shape[2]} "
                         f"(cross-attention is not supported)")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"scaled_dot_product_attention under dist_attn.context_parallel: query has {query.shape[1]} "
                         f"heads and key {key.shape[1]}; pass enable_gqa=True for grouped-query attention")
    out = ring_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), causal=bool(is_causal),
                         softmax_scale=scale, **options)
    return out.transpose(1, 2)


class _RingSDPAMode(TorchFunctionMode):
    def __init__(self, options):
        super().__init__()
        self.options = options

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return _ring_sdpa(self.options, *args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def context_parallel(group=None, layout="zigzag", *, backend=None):
    """Within the block, SDPA calls on this rank's shards run ring attention over ``group`` (None: the
    default group) with ``layout`` (see the module docstring). Every rank of ``group`` must enter it and
    make the same SDPA calls."""
    check_layout(layout)
    with _RingSDPAMode({"layout": layout, "group": as_group(group), "backend": backend}):
        yield
