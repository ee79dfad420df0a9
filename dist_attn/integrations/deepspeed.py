"""DeepSpeed adapter: ring attention as the local attention of DeepSpeed-Ulysses (hybrid Ulysses x ring).

DeepSpeed-Ulysses' ``deepspeed.sequence.layer.DistributedAttention(local_attention, ulysses_group)``
all-to-alls q, k, v from "all heads of L/u tokens" to "H/u heads of all L tokens of the group", calls
``local_attention(q, k, v, *args, **kwargs)`` and all-to-alls the output back. ``RingAttention`` is such a
local attention whose "all tokens" are one ring shard: it runs ``dist_attn.ring_attention`` over the
ring group, so the sequence spans u * r ranks::

    from deepspeed.sequence.layer import DistributedAttention
    from dist_attn.groups import sequence_parallel_groups
    from dist_attn.integrations.deepspeed import RingAttention, shard_batch

    groups = sequence_parallel_groups(ulysses_degree=2, ring_degree=2)           # every rank
    attn = DistributedAttention(RingAttention(group=groups.ring_group, causal=True, layout="zigzag"),
                                groups.ulysses_group)
    out = attn(q, k, v, 0)       # q: (B, L_local, H, D), k/v: (B, L_local, H_kv, D); batch_dim_idx=0
    # or, with batch_dim_idx held in one place and the head counts checked:
    attn = UlyssesRingAttention(groups.ulysses_group, groups.ring_group, causal=True, layout="zigzag")
    out = attn(q, k, v)

**Sharding contract.** Rank (ulysses_rank ur, ring_rank rr) must hold exactly
``dist_attn.usp_shard(x, layout, ur, u, rr, r)`` of every sequence: ring rank rr's shard
(``dist_attn.shard(x, layout, rr, r)``) cut into u contiguous equal pieces, piece ur on Ulysses rank ur.
Ulysses' all-to-all concatenates the group's pieces in rank order, which rebuilds that ring shard, and
the ring then sees the layout it expects. ``shard_batch`` does this for a batch (ids, labels, positions);
RoPE must use the global positions it returns (``usp_positions``), and labels must be shifted *before*
sharding (a token's target may live on another rank).

**What DeepSpeed hands the local attention.** ``DistributedAttention.forward(q, k, v, batch_dim_idx,
rotary_pos_emb=None, *args, **kwargs)`` passes ``(q, k, v, *args, **kwargs)`` to the local attention,
but not ``batch_dim_idx``: with ``batch_dim_idx=0`` the tensors are ``(batch, seq, heads, headdim)``,
with ``batch_dim_idx=1`` (Megatron-DeepSpeed) ``(seq, batch, heads, headdim)``. ``RingAttention`` must
therefore be built with the same ``batch_dim_idx`` (``UlyssesRingAttention`` does that for you).
Extra positional or keyword arguments (Megatron passes an ``attention_mask``) must be None: masks are
expressed by ``causal`` and ``window`` on global positions. Do not pass DeepSpeed ``rotary_pos_emb``
(it would be applied to the gathered sequence with local positions); rotate q and k before, by
global positions.

**GQA.** DeepSpeed splits K/V heads like query heads; ``nheads_kv`` must be a multiple of u (its
uneven-head path reads DeepSpeed's global sequence-parallel rank, which is not the Ulysses rank here).
``UlyssesRingAttention`` checks this.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dist_attn.layouts import check_layout
from dist_attn.ring import ring_attention
from dist_attn.ulysses import usp_positions, usp_shard

BATCH_DIM_IDXS = (0, 1)


def _check_batch_dim_idx(batch_dim_idx):
    if batch_dim_idx not in BATCH_DIM_IDXS or isinstance(batch_dim_idx, bool):
        raise ValueError(f"batch_dim_idx must be 0 (batch, seq, heads, headdim) or 1 (seq, batch, heads, headdim); "
                         f"got {batch_dim_idx!r}")


class RingAttention(torch.nn.Module):
    """Ring attention over ``group`` as a module: the ``local_attention`` of DeepSpeed's
    ``DistributedAttention`` (or a standalone sequence-parallel attention with ``group`` the whole SP group).

    forward(q, k, v): q (B, L, H, D), k/v (B, L, H_kv, D) with ``batch_dim_idx=0`` (the default), or
    (L, B, H, D) / (L, B, H_kv, D) with ``batch_dim_idx=1``; L is this rank's part of the sequence as
    ``dist_attn.shard(x, layout, rank_in_group, group_size)`` gives it (under DistributedAttention:
    the ring shard the Ulysses all-to-all reassembled). Returns the output in the same layout as q.
    ``group=None`` is the default (world) group, as in ``ring_attention``.
    """

    def __init__(self, group=None, causal=False, layout="zigzag", softmax_scale=None, window=None, *,
                 batch_dim_idx=0, backend=None):
        super().__init__()
        check_layout(layout)
        _check_batch_dim_idx(batch_dim_idx)
        self.group, self.causal, self.layout = group, causal, layout
        self.softmax_scale, self.window = softmax_scale, window
        self.batch_dim_idx, self.backend = batch_dim_idx, backend

    def forward(self, q, k, v, *args, **kwargs):
        extra = {f"positional argument {i + 3}": a for i, a in enumerate(args)} | kwargs
        given = [name for name, value in extra.items() if value is not None]
        if given:
            raise ValueError(f"RingAttention takes no attention mask or other extra arguments (got {given}); "
                             f"masks are causal= and window= on global positions")
        if self.batch_dim_idx == 1:  # (L, B, H, D) -> (B, L, H, D)
            q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        out = ring_attention(q, k, v, causal=self.causal, softmax_scale=self.softmax_scale, layout=self.layout,
                             group=self.group, window=self.window, backend=self.backend)
        return out.transpose(0, 1).contiguous() if self.batch_dim_idx == 1 else out

    def extra_repr(self):
        return (f"layout={self.layout!r}, causal={self.causal}, window={self.window}, "
                f"batch_dim_idx={self.batch_dim_idx}")


class UlyssesRingAttention(torch.nn.Module):
    """DeepSpeed's ``DistributedAttention`` over ``ulysses_group`` around a ``RingAttention`` over
    ``ring_group``, with ``batch_dim_idx`` given once and the head counts checked.

    forward(q, k, v): this rank's ``usp_shard`` tokens, (B, L_local, H, D) and (B, L_local, H_kv, D)
    (``batch_dim_idx=0``) or sequence-first (``batch_dim_idx=1``); returns (B, L_local, H, D) (or
    sequence-first). H and H_kv must be multiples of the Ulysses degree. Differentiable.
    """

    def __init__(self, ulysses_group, ring_group, causal=False, layout="zigzag", softmax_scale=None, window=None, *,
                 batch_dim_idx=0, backend=None):
        super().__init__()
        from deepspeed.sequence.layer import DistributedAttention

        self.ulysses_group, self.batch_dim_idx = ulysses_group, batch_dim_idx
        local = RingAttention(ring_group, causal, layout, softmax_scale, window, batch_dim_idx=batch_dim_idx,
                              backend=backend)
        self.attn = DistributedAttention(local, ulysses_group)

    def forward(self, q, k, v):
        u = dist.get_world_size(self.ulysses_group)
        nheads, nheads_kv = q.shape[2], k.shape[2]
        if nheads % u or nheads_kv % u:
            raise ValueError(f"nheads ({nheads}) and nheads_kv ({nheads_kv}) must be multiples of the Ulysses degree "
                             f"({u}) under DeepSpeed's DistributedAttention")
        return self.attn(q, k, v, self.batch_dim_idx)


SEQUENCE_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "loss_mask")


def shard_batch(batch: dict, groups, layout="zigzag", dim=1, keys=SEQUENCE_KEYS) -> dict:
    """This rank's part of a batch of full sequences under the sharding contract (``usp_shard``).

    ``batch``: {name: tensor}; the entries named in ``keys`` (default: input_ids, labels, position_ids,
    attention_mask, loss_mask) are sequences along ``dim`` (e.g. (B, T)) and are sharded; other entries are
    passed through. ``groups``: a ``dist_attn.groups.SequenceParallelGroups`` (its ulysses/ring rank and
    size are used; pure slicing, no communication). When ``batch`` has no ``position_ids``, they are added
    as ``usp_positions`` (1-D int64, (T_local,), the global position of every local token: broadcast it
    over the batch). Labels must already be shifted (``labels[t]`` is the target of token t).
    """
    check_layout(layout)
    seq_entries = [name for name in keys if name in batch]
    if not seq_entries:
        raise ValueError(f"batch has none of the sequence entries {keys}; got {sorted(batch)}")
    lengths = {name: batch[name].shape[dim] for name in seq_entries}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"sequence entries differ in length along dim {dim}: {lengths}")
    out = dict(batch)
    coords = (groups.ulysses_rank, groups.ulysses_size, groups.ring_rank, groups.ring_size)
    for name in seq_entries:
        out[name] = usp_shard(batch[name], layout, *coords, dim=dim)
    if "position_ids" not in batch:
        local_len = out[seq_entries[0]].shape[dim]
        out["position_ids"] = usp_positions(layout, *coords, local_len, device=batch[seq_entries[0]].device)
    return out


def __getattr__(name):
    """``SequenceParallelPipelineModule`` and ``check_pipeline_config`` live in ``deepspeed_pipeline`` (it
    imports DeepSpeed's pipeline engine at import time); they are reachable from here too."""
    if name in ("SequenceParallelPipelineModule", "check_pipeline_config"):
        from dist_attn.integrations import deepspeed_pipeline

        return getattr(deepspeed_pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
