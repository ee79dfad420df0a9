"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Algorithm (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; zigzag balancing as in
ring-flash-attention). Each rank keeps its queries. For w steps, K and V (one packed buffer) travel
one rank around the ring; at step s rank r holds the block of rank (r - s) mod w, starts sending it on
(``RingComm``) and, meanwhile, runs the local kernel for every (query segment, key segment) pair of
global positions that the mask leaves visible: pairs the causal mask or window removes entirely are
skipped without a kernel launch. Partial results merge in float32 (``merge_``) and are cast once.

Backward: the same ring. P = exp(S - lse) is recomputed with the *global* LSE saved by the forward, so
each block's gradients are exact without any merge. dQ accumulates at home; the float32 dK/dV
accumulator of each block travels with it on a second ring and arrives home after w hops.

    torchrun --nproc_per_node 4 your_script.py   # inside: out = ring_attention(q_local, k_local, v_local)
"""

from __future__ import annotations

import struct
import zlib

import torch
import torch.distributed as dist

from kernels import flash_attn_backward, flash_attn_forward, flash_attn_varlen_backward, flash_attn_varlen_forward
from kernels.positions import mask_band, visible_range
from kernels.validation import check_causal, check_qkv, check_scale, check_window
from kernels.varlen import check_cu_seqlens, check_packed, packed_pairs

from .comm import RingComm
from .layouts import (LAYOUTS, PackedSegment, check_layout, check_local_length, packed_local_length,
                      packed_segments, segments)
from .merge import merge_


def _segments(layout, rank, world_size, local_len, bounds):
    if bounds is not None:
        return packed_segments(layout, rank, world_size, bounds)
    return segments(layout, rank, world_size, local_len)


def _visible(q_seg, k_seg, causal, window):
    """Whether some query of q_seg sees some key of k_seg (for packed segments: in the same sequence)."""
    if isinstance(q_seg, PackedSegment):
        return bool(packed_pairs(q_seg.spans, k_seg.spans, q_seg.stride, k_seg.stride, causal, window))
    qpos, kpos = q_seg.positions, k_seg.positions
    below, above = mask_band(causal, window, qpos, kpos)
    start, end = visible_range(qpos.first, qpos.last, kpos, below, above)
    return end > start


def visible_pairs(layout, rank, source, world_size, local_len, causal, window, bounds=None):
    """(query segment of ``rank``, key segment of ``source``) pairs with at least one visible pair of
    positions: the kernel calls of one ring step. ``bounds``: cu_seqlens as a list, for packed input."""
    return [(q_seg, k_seg)
            for q_seg in _segments(layout, rank, world_size, local_len, bounds)
            for k_seg in _segments(layout, source, world_size, local_len, bounds)
            if _visible(q_seg, k_seg, causal, window)]


def _block_forward(q, kv, q_seg, k_seg, scale, causal, window, backend):
    """float32 output and LSE of q's rows ``q_seg`` against kv's rows ``k_seg`` (tensors batch-first;
    packed input is a batch of one)."""
    k, v = kv[0][:, k_seg.rows], kv[1][:, k_seg.rows]
    if isinstance(q_seg, PackedSegment):
        out, lse = flash_attn_varlen_forward(q[0, q_seg.rows], k[0], v[0], scale, causal, q_seg.spans, k_seg.spans,
                                             q_seg.stride, k_seg.stride, window, backend=backend,
                                             out_dtype=torch.float32)
        return out[None], lse[None]
    return flash_attn_forward(q[:, q_seg.rows], k, v, scale, causal, q_seg.offset, k_seg.offset, q_seg.stride,
                              k_seg.stride, window, backend=backend, out_dtype=torch.float32)


def _block_backward(dout, q, kv, out, lse, q_seg, k_seg, scale, causal, window, backend):
    """float32 dq, dk, dv of one (query segment, key segment) pair, batch-first."""
    rows, k, v = q_seg.rows, kv[0][:, k_seg.rows], kv[1][:, k_seg.rows]
    if isinstance(q_seg, PackedSegment):
        grads = flash_attn_varlen_backward(dout[0, rows], q[0, rows], k[0], v[0], out[0, rows], lse[0, :, rows],
                                           scale, causal, q_seg.spans, k_seg.spans, q_seg.stride, k_seg.stride,
                                           window, backend=backend)
        return tuple(g[None] for g in grads)
    return flash_attn_backward(dout[:, rows], q[:, rows], k, v, out[:, rows], lse[:, :, rows], scale, causal,
                               q_seg.offset, k_seg.offset, q_seg.stride, k_seg.stride, window, backend=backend)


def _world(group):
    """(rank, world size) in ``group``; a process without a process group is a world of one."""
    if not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class RingAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, layout, group, window, backend, bounds):
        rank, world_size = _world(group)
        local_len = q.shape[1]
        comm = RingComm(group, tag=0) if world_size > 1 else None
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], local_len), float("-inf"), device=q.device)
        kv, kv_next = torch.stack((k, v)), None  # one message per step: (2, batch, seqlen, nheads_kv, headdim)
        for step in range(world_size):
            source = (rank - step) % world_size
            if step + 1 < world_size:
                kv_next = comm.send_recv(kv, kv_next)
            for q_seg, k_seg in visible_pairs(layout, rank, source, world_size, local_len, causal, window, bounds):
                block_out, block_lse = _block_forward(q, kv, q_seg, k_seg, scale, causal, window, backend)
                merge_(out[:, q_seg.rows], lse[:, :, q_seg.rows], block_out, block_lse)
            if step + 1 < world_size:
                comm.wait()
                kv, kv_next = kv_next, kv  # the buffer just sent receives the next block
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, layout, group, window, backend, bounds)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, layout, group, window, backend, bounds = ctx.args
        rank, world_size = _world(group)
        local_len = q.shape[1]
        kv_comm = RingComm(group, tag=1) if world_size > 1 else None
        dkv_comm = RingComm(group, tag=2) if world_size > 1 else None
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv, kv_next = torch.stack((k, v)), None
        dkv_incoming = None  # the accumulator of the block this rank holds next, from the previous rank
        for step in range(world_size):
            source = (rank - step) % world_size
            if step + 1 < world_size:
                kv_next = kv_comm.send_recv(kv, kv_next)
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            for q_seg, k_seg in visible_pairs(layout, rank, source, world_size, local_len, causal, window, bounds):
                dq_part, dk_part, dv_part = _block_backward(dout, q, kv, out, lse, q_seg, k_seg, scale, causal,
                                                            window, backend)
                dq[:, q_seg.rows] += dq_part
                dkv[0][:, k_seg.rows] += dk_part
                dkv[1][:, k_seg.rows] += dv_part
            if world_size > 1:
                if dkv_incoming is not None:
                    dkv_comm.wait()
                    dkv += dkv_incoming
                dkv_incoming = dkv_comm.send_recv(dkv)  # on to the rank that holds this block next
            if step + 1 < world_size:
                kv_comm.wait()
                kv, kv_next = kv_next, kv
        if world_size > 1:
            dkv_comm.wait()
            dkv = dkv_incoming  # after w hops: this rank's own block, with every rank's contribution
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None, None, None


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_METADATA_FIELDS = ("batch", "local seqlen", "nheads", "nheads_kv", "headdim", "dtype", "layout", "causal",
                    "window left", "window right", "softmax_scale", "cu_seqlens checksum")


def _check_peers(q, k, causal, scale, layout, window, group, bounds):
    """One all-gather of every rank's metadata: a mismatch raises the same ValueError on all ranks
    instead of a hang or a silently wrong result."""
    left, right = window if window is not None else (None, None)
    checksum = -1 if bounds is None else zlib.crc32(struct.pack(f"<{len(bounds)}q", *bounds))
    mine = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], _DTYPE_CODES[q.dtype], LAYOUTS.index(layout),
            int(causal), -1 if left is None else left, -1 if right is None else right,
            struct.unpack("<q", struct.pack("<d", scale))[0], checksum]
    local = torch.tensor(mine, dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, local, group=group)
    table = torch.stack(everyone).cpu()
    differing = [name for i, name in enumerate(_METADATA_FIELDS) if not torch.all(table[:, i] == table[0, i])]
    if differing:
        rows = {name: table[:, _METADATA_FIELDS.index(name)].tolist() for name in differing}
        raise ValueError(f"ring_attention inputs differ across ranks (values per rank, softmax_scale as raw bits): "
                         f"{rows}; every rank must pass the same shapes, dtype, layout, causal, window, scale "
                         f"and cu_seqlens")


def ring_attention(q, k, v, causal=False, softmax_scale=None, layout="zigzag", group=None, window=None, *,
                   cu_seqlens=None, backend=None, check_peers=True):
    """Exact attention over a sequence sharded across ``group`` (SPMD: every rank calls it). Differentiable.

    q: (batch, local_seqlen, nheads, headdim); k, v: (batch, local_seqlen, nheads_kv, headdim): this
    rank's part of the sequence as ``shard(x, layout, rank, world_size)`` gives it. Returns this
    rank's part of the output, like q. ``layout``: "contiguous", "zigzag" or "striped" (see
    ``dist_attn.layouts``); ``window=(left, right)`` and ``causal`` act on global positions.

    Packed variable-length sequences: pass ``cu_seqlens``, the *global* cumulative lengths (int32,
    ``(batch + 1,)``, the same on every rank), and q: (local_tokens, nheads, headdim), k, v:
    (local_tokens, nheads_kv, headdim) as ``shard(x, layout, rank, world_size, cu_seqlens=cu_seqlens)``
    gives them (each sequence padded to a multiple of w, 2w for zigzag; see ``dist_attn.layouts``).
    No token attends to another sequence; padded rows give output 0 and get zero gradients.

    ``backend`` is passed to the local kernel. ``check_peers`` compares every rank's metadata with one
    small all-gather before the ring starts (a disagreement raises on all ranks instead of hanging).
    Without an initialised process group it runs as a world of one.
    """
    check_layout(layout)
    _, world_size = _world(group)
    bounds = None
    if cu_seqlens is not None:
        check_packed(q, k, v)
        bounds = tuple(check_cu_seqlens("cu_seqlens", cu_seqlens, None))
        expected = packed_local_length(bounds, layout, world_size)
        if q.shape[0] != expected:
            raise ValueError(f"q holds {q.shape[0]} packed tokens; cu_seqlens (global lengths "
                             f"{[b - a for a, b in zip(bounds, bounds[1:])]}) padded for layout={layout!r} and "
                             f"world size {world_size} give each rank {expected}: pass the shard() of the packed batch")
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    _, local_len, _, _, _, headdim = check_qkv(q, k, v)
    scale = check_scale(softmax_scale, headdim)
    window = check_window(window)
    check_causal(causal)
    if k.shape[1] != local_len:
        raise ValueError(f"q and k must hold the same tokens (one sharded sequence): local seqlen of q is "
                         f"{local_len}, of k {k.shape[1]}")
    if bounds is None:
        check_local_length(layout, local_len)
    if world_size > 1 and check_peers:
        _check_peers(q, k, causal, scale, layout, window, group, bounds)
    out = RingAttnFunc.apply(q, k, v, causal, scale, layout, group, window, backend, bounds)
    return out if bounds is None else out[0]
