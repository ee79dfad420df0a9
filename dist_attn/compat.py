"""ring-flash-attention's and yunchang's public call signatures on dist-attn: switching is one import line.

    from dist_attn.compat import zigzag_ring_flash_attn_func      # was: from ring_flash_attn import ...
    from dist_attn.compat import LongContextAttention, set_seq_parallel_pg   # was: from yunchang import ...

ring-flash-attention (``ring_flash_attn``): ``{ring,zigzag_ring,stripe}_flash_attn{,_kvpacked,_qkvpacked}_func``
and their ``_varlen_`` forms, ``(q, k, v, [cu_seqlens, max_seqlen,] dropout_p=0.0, softmax_scale=None,
causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False,
group=None)``. Their input layouts are ours: ``ring_`` = ``"contiguous"`` (rank r holds chunk r), ``zigzag_ring_``
= ``"zigzag"`` (chunks r and 2w-1-r of 2w), ``stripe_`` = ``"striped"`` (token t on rank t % w). q is (batch,
local_seqlen, nheads, headdim), kv ``(..., 2, nheads_kv, headdim)``, qkv ``(..., 3, nheads, headdim)``; varlen
inputs are (local_tokens, nheads, headdim) with ``cu_seqlens`` the *local* cumulative lengths (every sequence
split evenly over the ranks, as ring-flash-attention requires), ``max_seqlen`` its local maximum; zigzag rows
come per sequence (its chunk r, then its chunk 2w-1-r) and are reordered to dist-attn's packed zigzag order
and back.
``window_size=(left, right)``, -1 meaning unlimited, is honoured (ring-flash-attention itself ignores it).
``deterministic`` is accepted: dist-attn is always deterministic.

yunchang: ``set_seq_parallel_pg(sp_ulysses_degree, sp_ring_degree, rank, world_size, use_ulysses_low=True)``
creates the groups (``dist_attn.groups.sequence_parallel_groups``: the same ranks as yunchang's), and
``LongContextAttention(scatter_idx=2, gather_idx=1, ring_impl_type="basic")`` runs Ulysses x ring attention
(``dist_attn.usp_attention``) on this rank's tokens as yunchang places them (ring_impl_type ``"basic"``,
``"zigzag"``, ``"strip"``: the layouts above, cut into Ulysses pieces as ``dist_attn.usp_shard`` does).

yunchang's ``softcap`` (logit softcapping, 0.0 = off) is honoured.

Refused with a ValueError naming the argument: ``dropout_p`` > 0, ``alibi_slopes``, ``return_attn_probs=True``,
yunchang's ``use_ulysses_low=False``, other scatter/gather indices, QKV packing.
"""

from __future__ import annotations

import torch

from dist_attn.comm import as_group
from dist_attn.groups import sequence_parallel_groups
from dist_attn.ring import _world, ring_attention
from dist_attn.ulysses import usp_attention

RING_FLASH_ATTN_LAYOUTS = {"ring": "contiguous", "zigzag_ring": "zigzag", "stripe": "striped"}
YUNCHANG_LAYOUTS = {"basic": "contiguous", "zigzag": "zigzag", "strip": "striped"}


def _refuse_unsupported(name, dropout_p, alibi_slopes, return_attn_probs):
    if dropout_p != 0.0:
        raise ValueError(f"{name}: dropout_p must be 0 (attention dropout is not supported); got {dropout_p!r}")
    if alibi_slopes is not None:
        raise ValueError(f"{name}: alibi_slopes is not supported; pass None")
    if return_attn_probs:
        raise ValueError(f"{name}: return_attn_probs=True is not supported (the output alone is returned)")


def _window(name, window_size):
    """flash-attn's ``(left, right)`` with -1 for unlimited as dist-attn's window (None: no window)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"{name}: window_size must be a pair (left, right), -1 meaning unlimited; got {window_size!r}")
    window = tuple(None if side == -1 else side for side in window_size)
    return None if window == (None, None) else window


def _ring_flash_attn(name, layout):
    """The q, k, v function of one ring-flash-attention family, and its kvpacked and qkvpacked forms."""

    def func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
             deterministic=False, return_attn_probs=False, group=None):
        _refuse_unsupported(name, dropout_p, alibi_slopes, return_attn_probs)
        return ring_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, group=group,
                              window=_window(name, window_size))

    def kvpacked(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                 deterministic=False, return_attn_probs=False, group=None):
        return func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, alibi_slopes,
                    deterministic, return_attn_probs, group)

    def qkvpacked(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None,
                  deterministic=False, return_attn_probs=False, group=None):
        return func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                    alibi_slopes, deterministic, return_attn_probs, group)

    return _named(name, func, kvpacked, qkvpacked)


def _ring_flash_attn_varlen(name, layout):
    """The packed (varlen) function of one family, and its kvpacked and qkvpacked forms."""

    def func(q, k, v, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
             alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
        _refuse_unsupported(name, dropout_p, alibi_slopes, return_attn_probs)
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
            raise ValueError(f"{name}: cu_seqlens must be a 1-D tensor of local cumulative lengths")
        group = as_group(group)
        _, world_size = _world(group)
        global_cu_seqlens = (cu_seqlens.to(torch.int32) * world_size).cpu()  # each sequence split evenly
        order = _halves_first(cu_seqlens) if layout == "zigzag" else None
        if order is not None:
            q, k, v = q[order], k[order], v[order]
        out = ring_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, layout=layout, group=group,
                             window=_window(name, window_size), cu_seqlens=global_cu_seqlens)
        return out if order is None else out[torch.argsort(order)]

    def kvpacked(q, kv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                 window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
        return func(q, kv[:, 0], kv[:, 1], cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                    alibi_slopes, deterministic, return_attn_probs, group)

    def qkvpacked(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                  window_size=(-1, -1), alibi_slopes=None, deterministic=False, return_attn_probs=False, group=None):
        return func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
                    window_size, alibi_slopes, deterministic, return_attn_probs, group)

    return _named(name, func, kvpacked, qkvpacked)


def _halves_first(local_cu_seqlens):
    """Row order from ring-flash-attention's packed zigzag (per sequence: its chunk r, then its chunk 2w-1-r)
    to dist-attn's (chunk r of every sequence, then chunk 2w-1-r of every sequence)."""
    bounds = local_cu_seqlens.tolist()
    halves = [(a, (a + b) // 2, b) for a, b in zip(bounds, bounds[1:])]
    front = [torch.arange(a, m) for a, m, _ in halves]
    back = [torch.arange(m, b) for _, m, b in halves]
    return torch.cat(front + back).to(local_cu_seqlens.device) if halves else torch.zeros(0, dtype=torch.long)


def _named(name, func, kvpacked, qkvpacked):
    for fn, suffix in ((func, "func"), (kvpacked, "kvpacked_func"), (qkvpacked, "qkvpacked_func")):
        fn.__name__ = fn.__qualname__ = f"{name}_{suffix}"
        fn.__doc__ = f"ring-flash-attention's ``{fn.__name__}`` on dist-attn (see ``dist_attn.compat``)."
    return func, kvpacked, qkvpacked


ring_flash_attn_func, ring_flash_attn_kvpacked_func, ring_flash_attn_qkvpacked_func = _ring_flash_attn(
    "ring_flash_attn", "contiguous")
zigzag_ring_flash_attn_func, zigzag_ring_flash_attn_kvpacked_func, zigzag_ring_flash_attn_qkvpacked_func = (
    _ring_flash_attn("zigzag_ring_flash_attn", "zigzag"))
stripe_flash_attn_func, stripe_flash_attn_kvpacked_func, stripe_flash_attn_qkvpacked_func = _ring_flash_attn(
    "stripe_flash_attn", "striped")
ring_flash_attn_varlen_func, ring_flash_attn_varlen_kvpacked_func, ring_flash_attn_varlen_qkvpacked_func = (
    _ring_flash_attn_varlen("ring_flash_attn_varlen", "contiguous"))
(zigzag_ring_flash_attn_varlen_func, zigzag_ring_flash_attn_varlen_kvpacked_func,
 zigzag_ring_flash_attn_varlen_qkvpacked_func) = _ring_flash_attn_varlen("zigzag_ring_flash_attn_varlen", "zigzag")
stripe_flash_attn_varlen_func, stripe_flash_attn_varlen_kvpacked_func, stripe_flash_attn_varlen_qkvpacked_func = (
    _ring_flash_attn_varlen("stripe_flash_attn_varlen", "striped"))


# ---------------------------------------------------------------------------------------------- yunchang

_GROUPS = {}  # what set_seq_parallel_pg made: {"groups": SequenceParallelGroups}


def set_seq_parallel_pg(sp_ulysses_degree, sp_ring_degree, rank, world_size, use_ulysses_low=True):
    """yunchang's group set-up (a collective): Ulysses groups of adjacent ranks, rings across them, data
    parallel over the rest; the groups ``LongContextAttention`` uses."""
    if not use_ulysses_low:
        raise ValueError("set_seq_parallel_pg: use_ulysses_low=False (ring ranks adjacent) is not supported; dist-attn "
                         "puts Ulysses on adjacent ranks (use_ulysses_low=True)")
    if torch.distributed.get_rank() != rank or torch.distributed.get_world_size() != world_size:
        raise ValueError(f"set_seq_parallel_pg: rank ({rank}) and world_size ({world_size}) must be this process's "
                         f"({torch.distributed.get_rank()} of {torch.distributed.get_world_size()})")
    _GROUPS["groups"] = sequence_parallel_groups(sp_ulysses_degree, sp_ring_degree)


class LongContextAttention(torch.nn.Module):
    """yunchang's Ulysses x ring attention layer on dist-attn; forward(query, key, value, dropout_p=0.0,
    softmax_scale=None, causal=False, window_size=(-1, -1), alibi_slopes=None, deterministic=False,
    return_attn_probs=False, *, softcap=0.0) with (batch, local_seqlen, heads, headdim) tensors."""

    def __init__(self, scatter_idx=2, gather_idx=1, ring_impl_type="basic", use_pack_qkv=False, use_sync=False,
                 attn_type=None, attn_processor=None):
        super().__init__()
        if "groups" not in _GROUPS:
            raise ValueError("LongContextAttention: call set_seq_parallel_pg() first")
        if (scatter_idx, gather_idx) != (2, 1):
            raise ValueError(f"LongContextAttention: only scatter_idx=2, gather_idx=1 ((batch, seq, heads, headdim) "
                             f"inputs) are supported; got {scatter_idx}, {gather_idx}")
        if ring_impl_type not in YUNCHANG_LAYOUTS:
            raise ValueError(f"LongContextAttention: ring_impl_type must be one of {sorted(YUNCHANG_LAYOUTS)}; "
                             f"got {ring_impl_type!r}")
        if use_pack_qkv:
            raise ValueError("LongContextAttention: use_pack_qkv=True is not supported")
        if attn_processor is not None:
            raise ValueError("LongContextAttention: attn_processor is not supported (dist-attn runs its own kernel)")
        self.groups, self.layout = _GROUPS["groups"], YUNCHANG_LAYOUTS[ring_impl_type]

    def forward(self, query, key, value, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                alibi_slopes=None, deterministic=False, return_attn_probs=False, *args, softcap=0.0):
        _refuse_unsupported("LongContextAttention", dropout_p, alibi_slopes, return_attn_probs)
        return usp_attention(query, key, value, causal=causal, softmax_scale=softmax_scale, layout=self.layout,
                             ulysses_group=self.groups.ulysses_group, ring_group=self.groups.ring_group,
                             window=_window("LongContextAttention", window_size), softcap=softcap)
