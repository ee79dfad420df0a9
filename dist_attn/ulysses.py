"""Ulysses (all-to-all head/sequence re-sharding) and the hybrid Ulysses x ring attention (USP).

Ulysses (Jacobs et al. 2023, DeepSpeed-Ulysses) trades the sequence shard for a head shard with one
all-to-all: each of u ranks holding L tokens of all H heads ends up with u*L tokens of H/u heads, runs
attention locally, and a second all-to-all brings the output back. Its degree is capped by the head
count; a ring has no such cap but sends K/V every step. USP (Fang and Zhao 2024, yunchang) combines
them: Ulysses inside a group of u adjacent ranks (fast links), ``ring_attention`` across r such
groups, so the sequence spans u*r ranks.

Sharding contract (``usp_shard``): ring rank rr holds ``shard(x, layout, rr, r)`` of the full
sequence, and that ring shard is cut into u contiguous equal pieces, piece ur on Ulysses rank ur. The
Ulysses all-to-all then reassembles exactly the ring shard, with H/u heads, on every rank of the group.

GQA: K/V heads are split like query heads when ``nheads_kv % u == 0``; when ``nheads_kv < u`` and
``u % nheads_kv == 0`` each K/V head is replicated ``u // nheads_kv`` times, the least that gives every
Ulysses rank one (query head h keeps reading K/V head ``h // (nheads // nheads_kv)``); anything else
is an error.

    out_local = usp_attention(q_local, k_local, v_local, causal=True, layout="zigzag",
                              ulysses_group=groups.ulysses_group, ring_group=groups.ring_group)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_attn.kernels import flash_attn_func
from dist_attn.kernels.validation import (check_causal, check_qkv, check_scale, check_sinks, check_softcap,
                                         check_window)

from .comm import as_group, record_traffic
from .layouts import check_layout, check_local_length, chunks_per_rank, gather, global_positions, shard
from .masks import check_mask_args
from .ring import ring_attention


def _degree(group):
    """(rank, size) in ``group`` (a process group or a one-dimensional DeviceMesh); None is a group of one."""
    group = as_group(group)
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_to_all(x, group):
    """x: (u, ...) with x[j] for rank j; returns (u, ...) with [i] from rank i."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous(): empty_like keeps a permuted input's strides
    dist.all_to_all_single(out, x, group=group)
    record_traffic(x[0].numel() * x.element_size() * (x.shape[0] - 1))  # what leaves this rank
    return out


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _heads_to_seq(grad, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_heads(grad, ctx.group), None


def _seq_to_heads(x, group):
    _, u = _degree(group)
    batch, seqlen, nheads, headdim = x.shape
    if nheads % u:
        raise ValueError(f"nheads ({nheads}) must be divisible by the Ulysses group size ({u}): each rank gets "
                         f"nheads / {u} whole heads")
    parts = x.reshape(batch, seqlen, u, nheads // u, headdim).permute(2, 0, 1, 3, 4)  # (u, B, L, H/u, D) by head group
    received = _all_to_all(parts, group)  # (u, B, L, H/u, D) by sequence piece
    return received.permute(1, 0, 2, 3, 4).reshape(batch, u * seqlen, nheads // u, headdim)


def _heads_to_seq(x, group):
    _, u = _degree(group)
    batch, seqlen, nheads, headdim = x.shape
    parts = x.reshape(batch, u, seqlen // u, nheads, headdim).permute(1, 0, 2, 3, 4)  # (u, B, L/u, H/u, D) by piece
    received = _all_to_all(parts, group)  # (u, B, L/u, H/u, D) by head group
    return received.permute(1, 2, 0, 3, 4).reshape(batch, seqlen // u, u * nheads, headdim)


def seq_to_heads(x, group):
    """(B, L, H, D) sequence-sharded -> (B, u*L, H/u, D) head-sharded over ``group`` (differentiable)."""
    if _degree(group)[1] == 1:
        return x
    return _SeqToHeads.apply(x, as_group(group))


def heads_to_seq(x, group):
    """The inverse of ``seq_to_heads``: (B, u*L, H/u, D) -> (B, L, H, D) (differentiable)."""
    if _degree(group)[1] == 1:
        return x
    return _HeadsToSeq.apply(x, as_group(group))


def _check_coordinates(ulysses_rank, ulysses_size, ring_rank, ring_size):
    for name, rank, size in (("ulysses", ulysses_rank, ulysses_size), ("ring", ring_rank, ring_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name}_size must be an int >= 1; got {size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
            raise ValueError(f"{name}_rank must be an int in [0, {size}); got {rank!r}")


def usp_shard(x, layout, ulysses_rank, ulysses_size, ring_rank, ring_size, dim=None, *, cu_seqlens=None, mask=None):
    """This rank's tokens of the full sequence ``x`` (pure slicing; see the sharding contract above).

    ``dim`` defaults to 1, or to 0 for packed sequences (``cu_seqlens``: the global cumulative lengths, as for
    ``shard``): the ring shard ``shard(x, layout, ring_rank, ring_size, cu_seqlens=cu_seqlens)``, padding
    included, is cut into ``ulysses_size`` contiguous pieces, so its length must divide by ``ulysses_size``.
    ``mask``: the ``dist_attn.masks.Mask`` of layout="balanced" (balanced over the ring degree)."""
    _check_coordinates(ulysses_rank, ulysses_size, ring_rank, ring_size)
    dim = (1 if cu_seqlens is None else 0) if dim is None else dim
    ring_shard = shard(x, layout=layout, rank=ring_rank, world_size=ring_size, dim=dim, cu_seqlens=cu_seqlens,
                       mask=mask)
    if ring_shard.shape[dim] % ulysses_size:
        if cu_seqlens is not None:
            raise ValueError(f"the ring shard of the packed sequences holds {ring_shard.shape[dim]} tokens (padding "
                             f"included), not a multiple of the Ulysses degree {ulysses_size}: pad the sequences "
                             f"(e.g. each to a multiple of {ring_size * chunks_per_rank(layout) * ulysses_size})")
        per_ring_rank = "" if mask is None else f" and ring rank ({ring_shard.shape[dim]} tokens)"
        multiple = ring_size * (1 if mask is not None else chunks_per_rank(layout)) * ulysses_size
        raise ValueError(f"sequence length ({x.shape[dim]}){per_ring_rank} must be a multiple of {multiple} for "
                         f"layout={layout!r} with ring degree {ring_size} and Ulysses degree {ulysses_size}")
    return ring_shard.chunk(ulysses_size, dim=dim)[ulysses_rank]


def usp_positions(layout, ulysses_rank, ulysses_size, ring_rank, ring_size, local_len, device=None, *, mask=None):
    """Global position of every local token under ``usp_shard`` (1-D int64): for RoPE and labels."""
    _check_coordinates(ulysses_rank, ulysses_size, ring_rank, ring_size)
    ring_positions = global_positions(layout, ring_rank, ring_size, local_len * ulysses_size, device=device,
                                      mask=mask)
    return ring_positions.chunk(ulysses_size)[ulysses_rank]


def usp_gather(x_local, layout, ulysses_group=None, ring_group=None, dim=None, *, cu_seqlens=None, mask=None):
    """The full sequence from every rank's ``usp_shard`` piece (collective over both groups); ``dim``,
    ``cu_seqlens`` and ``mask`` as for ``usp_shard`` (packed: the padding rows dropped)."""
    check_layout(layout, mask)
    dim = (1 if cu_seqlens is None else 0) if dim is None else dim
    ulysses_group, ring_group = as_group(ulysses_group, "ulysses_group"), as_group(ring_group, "ring_group")
    _, u = _degree(ulysses_group)
    ring_shard = x_local
    if u > 1:
        pieces = [torch.empty_like(x_local) for _ in range(u)]
        dist.all_gather(pieces, x_local.contiguous(), group=ulysses_group)
        ring_shard = torch.cat(pieces, dim=dim)
    if _degree(ring_group)[1] == 1 and cu_seqlens is None:
        return ring_shard
    return gather(ring_shard, layout=layout, group=ring_group, dim=dim, cu_seqlens=cu_seqlens, mask=mask)


def usp_attention(q, k, v, causal=False, softmax_scale=None, layout="zigzag", ulysses_group=None, ring_group=None,
                  window=None, *, softcap=None, sinks=None, cu_seqlens=None, mask=None):
    """Exact attention over a sequence sharded across Ulysses x ring groups (``usp_shard``). Differentiable.

    q: (batch, local_seqlen, nheads, headdim), k: (batch, local_seqlen, nheads_kv, headdim), v: (batch,
    local_seqlen, nheads_kv, headdim_v) on every rank of both groups; ``None`` for a group means degree 1.
    Returns this rank's output, (batch, local_seqlen, nheads, headdim_v). ``softcap`` and ``sinks`` (nheads,)
    as in ``ring_attention``: each Ulysses rank uses the sinks of the heads it holds, and d sinks is this
    rank's share (zero on the other heads).

    Packed sequences: ``cu_seqlens`` (global, as for ``ring_attention``) and q: (local_tokens, nheads,
    headdim), k/v: (local_tokens, nheads_kv, headdim) as ``usp_shard(x, ..., cu_seqlens=cu_seqlens)`` places
    them. With packing, ``ring_group`` must be given in a multi-rank world (a group of one for ring degree 1,
    as ``sequence_parallel_groups`` provides), since None would mean the default group to ``ring_attention``.

    ``mask``: a ``dist_attn.masks.Mask`` over the full sequence, as for ``ring_attention`` (in place of causal,
    window and cu_seqlens; ``layout="balanced"`` balances it over the ring degree); ``ring_group`` must then be
    given in a multi-rank world too.
    """
    ulysses_group, ring_group = as_group(ulysses_group, "ulysses_group"), as_group(ring_group, "ring_group")
    check_mask_args(mask, causal, window, cu_seqlens)
    if mask is not None and ring_group is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("ring_group must be given with mask in a multi-rank world (a group of one for ring degree "
                         "1): None would run the ring over the default group")
    packed = cu_seqlens is not None
    if packed:  # the same path on (1, tokens, heads, headdim) views; the ring's packed path at its end
        _check_packed(q, k, v, ring_group)
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    _, _, _, nheads, nheads_kv, headdim = check_qkv(q, k, v)
    scale = check_scale(softmax_scale, headdim)
    window = check_window(window)
    softcap = check_softcap(softcap)
    check_sinks(sinks, nheads, q)
    check_causal(causal)
    check_layout(layout, mask)
    _, u = _degree(ulysses_group)
    _, r = _degree(ring_group)
    if nheads % u:
        raise ValueError(f"nheads ({nheads}) must be divisible by the Ulysses degree ({u})")
    if nheads_kv % u:
        if u % nheads_kv:
            raise ValueError(f"nheads_kv ({nheads_kv}) must divide or be a multiple of the Ulysses degree ({u})")
        k, v = (x.repeat_interleave(u // nheads_kv, dim=2) for x in (k, v))  # one K/V head per Ulysses rank
    q, k, v = (seq_to_heads(x, ulysses_group) for x in (q, k, v))  # (B, u*L, H/u, D): this ring rank's shard
    if sinks is not None:  # the sinks of this rank's heads (seq_to_heads gives rank i heads i*H/u ..)
        heads = nheads // u
        sinks = sinks[_degree(ulysses_group)[0] * heads:][:heads]
    features = dict(softmax_scale=scale, window=window, softcap=softcap, sinks=sinks)
    if mask is not None:
        out = ring_attention(q, k, v, layout=layout, group=ring_group, mask=mask, **features)
    elif packed:
        out = ring_attention(q[0], k[0], v[0], causal=causal, layout=layout, group=ring_group, cu_seqlens=cu_seqlens,
                             **features)[None]
    elif r == 1:  # the whole sequence, in order, is here
        out = flash_attn_func(q, k, v, causal=causal, **features)
    else:
        check_local_length(layout, q.shape[1])
        out = ring_attention(q, k, v, causal=causal, layout=layout, group=ring_group, **features)
    out = heads_to_seq(out, ulysses_group)
    return out[0] if packed else out


def _check_packed(q, k, v, ring_group):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"{name} must be a 3-D (local_tokens, heads, headdim) tensor with cu_seqlens; got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if ring_group is None and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("ring_group must be given with cu_seqlens in a multi-rank world (a group of one for ring "
                         "degree 1): None would run the ring over the default group")
