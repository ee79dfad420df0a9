"""Ring attention: exact attention over a sequence sharded across the ranks of a process group.

Algorithm (Liu et al. 2023, "Ring Attention with Blockwise Transformers"; zigzag balancing as in
ring-flash-attention). Each rank keeps its queries. For w steps, K and V (one buffer: K and V side by side
on the head dim, so MLA's narrower V costs no padding) travel one rank around the ring; at step s rank r
holds the block of rank (r - s) mod w, starts sending it on
(``RingComm``) and, meanwhile, runs the local kernel for every (query segment, key segment) pair of
global positions that the mask leaves visible: pairs the causal mask or window removes entirely are
skipped without a kernel launch. Partial results merge in float32 inside the kernel's epilogue
(``accumulate=``, the ``dist_attn.kernels.merge`` rule) and are cast once.

Backward: the same ring. P = exp(S - lse) is recomputed with the *global* LSE saved by the forward, so
each block's gradients are exact without any merge. Attention sinks (one logit per query head) enter that
global LSE once, after the last step (``merge.add_sinks_``), and their gradient needs only it and the
output (``merge.sinks_grad``): no ring step sees them. dQ accumulates at home; the float32 dK/dV
accumulator of each block travels with it on a second ring and arrives home after w hops.

Two variations of the schedule, same results: with a sliding window only the blocks some rank needs
travel (``ring_plan``: some hops forward, some backward); across nodes the hierarchical ring
(``_hierarchical_ring``, nodes from ``dist_attn.topology``) circulates blocks inside each node and moves
them between nodes once per g steps. Packed sequences (``cu_seqlens``) use the same schedule with
``PackedSegment`` s and the kernel's varlen entry points. A ``mask`` (``dist_attn.masks``) turns each step
into the pieces of its slices between the two ranks' rows (``masks.slice_pairs``), run in one launch per
kernel (``flash_attn_pairs_forward``); the plan then sends only the blocks some rank's pieces need.

    torchrun --nproc_per_node 4 your_script.py   # inside: out = ring_attention(q_local, k_local, v_local)
"""

from __future__ import annotations

import functools
import os
import struct
import zlib

import torch
import torch.distributed as dist

from dist_attn.kernels import (flash_attn_backward, flash_attn_forward, flash_attn_varlen_backward,
                               flash_attn_varlen_forward)
from dist_attn.kernels.merge import add_sinks_, sinks_grad
from dist_attn.kernels.positions import mask_band, visible_range
from dist_attn.kernels.validation import check_causal, check_qkv, check_scale, check_sinks, check_softcap, check_window
from dist_attn.kernels.varlen import (check_cu_seqlens, check_packed, flash_attn_pairs_backward,
                                     flash_attn_pairs_forward, packed_pairs)

from .checkpointing import active_cache
from .comm import RingComm, as_group
from .layouts import (LAYOUTS, MASK_LAYOUTS, PackedSegment, check_layout, check_local_length, packed_local_length,
                      packed_segments, segments)
from .masks import check_mask_args, slice_pairs
from .topology import ENV_LOCAL_WORLD_SIZE, TOPOLOGIES, check_topology, resolve


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
    positions: the kernel calls of one ring step. ``bounds``: cu_seqlens as a tuple, for packed input."""
    return [(q_seg, k_seg)
            for q_seg in _segments(layout, rank, world_size, local_len, bounds)
            for k_seg in _segments(layout, source, world_size, local_len, bounds)
            if _visible(q_seg, k_seg, causal, window)]


@functools.lru_cache(maxsize=1024)
def mask_pairs(mask, layout, rank, source, world_size, local_len, batch=1):
    """The kernel pairs (``PackedPair`` s) of one ring step under ``mask``: rank's query rows against source's
    key rows, batch after batch in a packed (batch * local_len) view."""
    pairs = slice_pairs(mask, segments(layout, rank, world_size, local_len, mask),
                        segments(layout, source, world_size, local_len, mask))
    return tuple(p._replace(q_start=p.q_start + b * local_len, k_start=p.k_start + b * local_len)
                 for b in range(batch) for p in pairs)


def _split(kv, headdim):
    """(k, v): views of a K/V message (batch, seqlen, nheads_kv, headdim + headdim_v)."""
    return kv[..., :headdim], kv[..., headdim:]


def _block_forward(q, kv, q_seg, k_seg, scale, causal, window, softcap, backend, out, lse):
    """Merges the attention of q's rows ``q_seg`` against kv's rows ``k_seg`` into the float32
    accumulators ``out``, ``lse`` (tensors batch-first; packed input is a batch of one)."""
    k, v = (x[:, k_seg.rows] for x in _split(kv, q.shape[-1]))
    rows = q_seg.rows
    if isinstance(q_seg, PackedSegment):
        flash_attn_varlen_forward(q[0, rows], k[0], v[0], scale, causal, q_seg.spans, k_seg.spans, q_seg.stride,
                                  k_seg.stride, window, softcap=softcap, backend=backend,
                                  accumulate=(out[0, rows], lse[0, :, rows]))
        return
    flash_attn_forward(q[:, rows], k, v, scale, causal, q_seg.offset, k_seg.offset, q_seg.stride, k_seg.stride,
                       window, softcap=softcap, backend=backend, accumulate=(out[:, rows], lse[:, :, rows]))


def _block_backward(dout, q, kv, out, lse, q_seg, k_seg, scale, causal, window, softcap, backend, dq, dkv):
    """Adds the float32 dq, dk, dv of one (query segment, key segment) pair into ``dq`` and ``dkv``
    (batch-first, laid out like the K/V message)."""
    rows, cols = q_seg.rows, k_seg.rows
    k, v = (x[:, cols] for x in _split(kv, q.shape[-1]))
    dk, dv = (x[:, cols] for x in _split(dkv, q.shape[-1]))
    if isinstance(q_seg, PackedSegment):
        flash_attn_varlen_backward(dout[0, rows], q[0, rows], k[0], v[0], out[0, rows], lse[0, :, rows], scale,
                                   causal, q_seg.spans, k_seg.spans, q_seg.stride, k_seg.stride, window,
                                   softcap=softcap, backend=backend, accumulate=(dq[0, rows], dk[0], dv[0]))
        return
    flash_attn_backward(dout[:, rows], q[:, rows], k, v, out[:, rows], lse[:, :, rows], scale, causal,
                        q_seg.offset, k_seg.offset, q_seg.stride, k_seg.stride, window, softcap=softcap,
                        backend=backend, accumulate=(dq[:, rows], dk, dv))


def _world(group):
    """(rank, world size) in ``group``; a process without a process group is a world of one."""
    if not dist.is_initialized():
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


@functools.lru_cache(maxsize=256)
def ring_plan(layout, world_size, local_len, causal, window, bounds=None, mask=None):
    """``(forward_hops, backward_hops)``: how far K/V travel each way around the ring.

    A full ring sends every block w - 1 hops forward. When a window keeps every query near its own
    position, most blocks are needed by no rank: the block of rank r - d is needed only if
    ``visible_pairs`` of some rank at source distance d is non-empty. Distances 1..a then travel
    forward and w-b..w-1 backward (the zigzag's second chunk needs the *next* rank's block), with
    a + b as small as possible; blocks nobody needs are never sent. A ``mask`` decides the same way, from
    its pieces (``mask_pairs``); causal and window are then unused.
    """
    if world_size == 1:
        return 0, 0
    if window is None and bounds is None and mask is None:  # every distance is needed (the last rank, causal)
        return world_size - 1, 0
    tuple_window = None if window is None else tuple(window)

    def needs(rank, source):
        if mask is not None:
            return bool(mask_pairs(mask, layout, rank, source, world_size, local_len))
        return bool(visible_pairs(layout, rank, source, world_size, local_len, causal, tuple_window, bounds))
    return plan_for_distances([d for d in range(1, world_size)
                               if any(needs(r, (r - d) % world_size) for r in range(world_size))], world_size)


def plan_for_distances(needed, world_size):
    """The cheapest ``(forward_hops, backward_hops)`` that bring every block at a source distance in ``needed``
    (ascending, in 1..w-1): distances 1..a forward and w-b..w-1 backward, a + b as small as possible."""
    if not needed:
        return 0, 0
    best = (needed[-1], 0)
    for forward in [0] + needed:
        rest = [d for d in needed if d > forward]
        backward = world_size - rest[0] if rest else 0
        if forward + backward < sum(best):
            best = (forward, backward)
    return best


class _Relay:
    """K/V travelling ``hops`` ranks in one direction (+1: to the next member of the ring),
    double-buffered: ``start(step)`` begins the transfer for step + 1, ``finish(step)`` waits and swaps
    buffers. A ``borrowed`` first block is read, never received into (another relay still sends it)."""

    def __init__(self, group, tag, kv, hops, direction, members=None, borrowed=False):
        self.comm = RingComm(group, tag, members, _TAG_NAMES[tag]) if hops else None
        self.kv, self.spare, self.hops, self.direction = kv, None, hops, direction
        self.borrowed = kv if borrowed else None

    def start(self, step):
        if step < self.hops:
            self.spare = self.comm.send_recv(self.kv, self.spare, self.direction)

    def finish(self, step):
        if step < self.hops:
            self.comm.wait()
            self.kv, self.spare = self.spare, None if self.kv is self.borrowed else self.kv


class _GradChain:
    """The float32 dK/dV accumulator of a travelling block: each rank adds its part and passes it on
    (``direction``) until the last hop, which sends it straight back to the block's owner."""

    def __init__(self, group, tag, hops, direction, members=None):
        self.comm = RingComm(group, tag, members, _TAG_NAMES[tag]) if hops else None
        self.hops, self.direction, self.incoming = hops, direction, None

    def add_and_pass(self, step, dkv):
        """``dkv``: this rank's part for the block it holds at ``step`` (the chain's first rank is at
        step 0 forward, step 1 backward). Returns nothing; ``home()`` gives the block's total."""
        if self.incoming is not None:
            self.comm.wait()
            dkv += self.incoming
        last = step == self.hops
        self.incoming = self.comm.send_recv(dkv, distance=-self.direction * step if last else self.direction)

    def home(self):
        self.comm.wait()
        return self.incoming


def _sources(rank, world_size, step, fwd_hops, bwd_hops):
    """(relay index, source rank) of the blocks computed at ``step``: forward distance ``step`` and,
    for the reverse relay, the rank ``step`` places ahead."""
    if step <= fwd_hops:
        yield 0, (rank - step) % world_size
    if 1 <= step <= bwd_hops:
        yield 1, (rank + step) % world_size


def _flat_ring(group, kv, plan, visit, tags):
    """Runs ``visit(kv_block, source)`` on every block the plan brings to this rank (``ring_plan``).
    ``visit`` returns the block's float32 dK/dV in the backward (then ``tags`` has four entries: two
    relays, two gradient chains) and this rank's own dK/dV total is returned; None in the forward."""
    rank, world_size = _world(group)
    fwd_hops, bwd_hops = plan
    relays = (_Relay(group, tags[0], kv, fwd_hops, 1), _Relay(group, tags[1], kv.clone() if bwd_hops else None,
                                                              bwd_hops, -1))
    chains = (_GradChain(group, tags[2], fwd_hops, 1), _GradChain(group, tags[3], bwd_hops, -1)) if len(tags) > 2 else None
    own_dkv = None
    for step in range(max(fwd_hops, bwd_hops) + 1):
        for relay in relays:
            relay.start(step)
        for which, source in _sources(rank, world_size, step, fwd_hops, bwd_hops):
            dkv = visit(relays[which].kv, source)
            if chains and chains[which].hops:
                chains[which].add_and_pass(step, dkv)
            elif chains:  # nothing travels: this is the rank's own block
                own_dkv = dkv
        for relay in relays:
            relay.finish(step)
    if not chains:
        return None
    dkv = own_dkv if fwd_hops == 0 else chains[0].home()
    return dkv + chains[1].home() if bwd_hops else dkv


def _hierarchical_ring(group, kv, nodes, visit, tags):
    """The double ring over ``nodes`` (a ``Topology``), same contract as ``_flat_ring``.

    Outer step j: every rank holds, in the outer buffer, the block of the rank with its own local
    index j nodes back, and at once starts sending it on to the same local index of the next node (the
    slow inter-node link gets g inner steps to finish). Meanwhile that block goes around the node's
    fast inner ring, so at inner step i the rank holds the block of local index l - i on node n - j.
    Backward: dK/dV accumulate around the inner ring and come back to the rank that brought the block
    into the node, then travel the outer ring with the block's other node sums to its owner.
    """
    node, local = nodes.locate(_world(group)[0])
    outer_members = [nodes.rank_at(other, local) for other in range(nodes.node_count)]
    outer = _Relay(group, tags[0], kv, nodes.node_count - 1, 1, outer_members)
    outer_chain = _GradChain(group, tags[2], nodes.node_count - 1, 1, outer_members) if len(tags) > 2 else None
    for j in range(nodes.node_count):
        outer.start(j)
        inner = _Relay(group, tags[1], outer.kv, nodes.local_size - 1, 1, nodes.nodes[node], borrowed=True)
        inner_chain = _GradChain(group, tags[3], nodes.local_size - 1, 1, nodes.nodes[node]) if outer_chain else None
        for i in range(nodes.local_size):
            inner.start(i)
            dkv = visit(inner.kv, nodes.rank_at(node - j, local - i))
            if inner_chain:
                inner_chain.add_and_pass(i, dkv)
            inner.finish(i)
        if outer_chain:
            outer_chain.add_and_pass(j, inner_chain.home())
        outer.finish(j)
    return outer_chain.home() if outer_chain else None


def _run_ring(group, kv, nodes, plan, visit, tags):
    if nodes is None:
        return _flat_ring(group, kv, plan, visit, tags[0])
    return _hierarchical_ring(group, kv, nodes, visit, tags[1])


# message tags (gloo matches by tag): (flat: relays, chains), (hierarchical: outer, inner, chains)
_FORWARD_TAGS = ((0, 3), (6, 7))
_BACKWARD_TAGS = ((1, 4, 2, 5), (8, 9, 10, 11))
_TAG_NAMES = {0: "forward K/V ring", 3: "forward reverse K/V ring", 6: "forward inter-node K/V ring",
              7: "forward intra-node K/V ring", 1: "backward K/V ring", 4: "backward reverse K/V ring",
              2: "backward dK/dV ring", 5: "backward reverse dK/dV ring", 8: "backward inter-node K/V ring",
              9: "backward intra-node K/V ring", 10: "backward inter-node dK/dV ring",
              11: "backward intra-node dK/dV ring"}


def _packed(x):
    """(batch, seqlen, heads, dim) -> (batch * seqlen, heads, dim), the layout the pair kernels take: a view
    (accumulators must be one, the kernels write into them), else a copy."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _accumulators(q, v, mask):
    """Zero float32 out (batch, seqlen, nheads, headdim_v) and -inf lse (batch, nheads, seqlen). For a mask, views
    of packed (batch * seqlen, nheads, headdim_v) and (nheads, batch * seqlen) tensors, which the pair kernels take
    (``_packed_lse`` gives that lse back)."""
    batch, local_len, nheads, _ = q.shape
    if mask is None:
        out = torch.zeros(q.shape[:3] + v.shape[3:], dtype=torch.float32, device=q.device)
        return out, torch.full((batch, nheads, local_len), float("-inf"), device=q.device)
    out = torch.zeros((batch * local_len, nheads, v.shape[3]), dtype=torch.float32, device=q.device)
    lse = torch.full((nheads, batch * local_len), float("-inf"), device=q.device)
    return out.view(q.shape[:3] + v.shape[3:]), lse.view(nheads, batch, local_len).permute(1, 0, 2)


def _packed_lse(lse):
    """The (nheads, batch * seqlen) tensor under an lse view of ``_accumulators``."""
    return lse.permute(1, 0, 2).reshape(lse.shape[1], -1)


def _ring_forward(q, k, v, sinks, causal, scale, layout, group, window, softcap, backend, bounds, plan, nodes, mask):
    """The forward ring: (out in q's dtype, float32 LSE (batch, nheads, local_len)), sinks included."""
    rank, world_size = _world(group)
    batch, local_len = q.shape[:2]
    out, lse = _accumulators(q, v, mask)
    if mask is not None:  # the pair kernels' packed layout, once: views of the accumulators
        q_rows, out_rows, lse_rows = _packed(q), out.view(-1, *out.shape[2:]), _packed_lse(lse)

    def visit(kv, source):
        if mask is not None:
            pairs = mask_pairs(mask, layout, rank, source, world_size, local_len, batch)
            flash_attn_pairs_forward(q_rows, *_split(_packed(kv), q.shape[-1]), scale, pairs, out_rows, lse_rows,
                                     softcap=softcap, backend=backend)
            return
        for q_seg, k_seg in visible_pairs(layout, rank, source, world_size, local_len, causal, window, bounds):
            _block_forward(q, kv, q_seg, k_seg, scale, causal, window, softcap, backend, out, lse)

    # one message per step: (batch, seqlen, nheads_kv, headdim + headdim_v)
    _run_ring(group, torch.cat((k, v), dim=-1), nodes, plan, visit, _FORWARD_TAGS)
    if sinks is not None:
        add_sinks_(out, lse, sinks)
    return out.to(q.dtype), lse


class RingAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, causal, scale, layout, group, window, softcap, backend, bounds, plan, nodes,
                mask):
        cache = active_cache()  # inside dist_attn.checkpoint: the recompute replays the forward's out and LSE
        if cache is not None and cache.replaying:
            out, lse = cache.replay(q.shape[:3] + v.shape[3:])
        else:
            out, lse = _ring_forward(q, k, v, sinks, causal, scale, layout, group, window, softcap, backend, bounds,
                                     plan, nodes, mask)
            if cache is not None:
                cache.record(out, lse)
        ctx.save_for_backward(q, k, v, sinks, out, lse)
        ctx.args = (causal, scale, layout, group, window, softcap, backend, bounds, plan, nodes, mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks, out, lse = ctx.saved_tensors
        causal, scale, layout, group, window, softcap, backend, bounds, plan, nodes, mask = ctx.args
        rank, world_size = _world(group)
        batch, local_len = q.shape[:2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        if mask is not None:  # the pair kernels' packed layout, once (dq's is a view)
            rows = (_packed(dout), _packed(q), _packed(out), _packed_lse(lse), dq.view(-1, *dq.shape[2:]))
        headdim = q.shape[-1]

        def visit(kv, source):
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            if mask is not None:
                dout_rows, q_rows, out_rows, lse_rows, dq_rows = rows
                pairs = mask_pairs(mask, layout, rank, source, world_size, local_len, batch)
                flash_attn_pairs_backward(dout_rows, q_rows, *_split(_packed(kv), headdim), out_rows, lse_rows, scale,
                                          pairs, dq_rows, *_split(dkv.view(-1, *dkv.shape[2:]), headdim),
                                          softcap=softcap, backend=backend)
                return dkv
            for q_seg, k_seg in visible_pairs(layout, rank, source, world_size, local_len, causal, window, bounds):
                _block_backward(dout, q, kv, out, lse, q_seg, k_seg, scale, causal, window, softcap, backend, dq,
                                dkv)
            return dkv

        dkv = _run_ring(group, torch.cat((k, v), dim=-1), nodes, plan, visit, _BACKWARD_TAGS)
        dk, dv = _split(dkv, q.shape[-1])
        dsinks = None if sinks is None else sinks_grad(sinks, lse, out, dout)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsinks) + (None,) * 11


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_METADATA_FIELDS = ("batch", "local seqlen", "nheads", "nheads_kv", "headdim_qk", "headdim_v", "dtype", "layout",
                    "causal", "window left", "window right", "softmax_scale", "softcap", "sinks checksum",
                    "cu_seqlens checksum", "mask checksum", "topology", ENV_LOCAL_WORLD_SIZE)


def _local_size_setting():
    """DIST_ATTN_LOCAL_WORLD_SIZE as an int for the peers' check: -1 unset, -2 not an int."""
    value = os.environ.get(ENV_LOCAL_WORLD_SIZE)
    if value is None:
        return -1
    return int(value) if value.strip().isdigit() else -2


def _bits(number):
    """A float's raw bits as an int64 (-1 for None)."""
    return -1 if number is None else struct.unpack("<q", struct.pack("<d", number))[0]


def _check_peers(q, k, v, sinks, causal, scale, layout, window, softcap, group, bounds, mask, topology):
    """One all-gather of every rank's metadata: a mismatch raises the same ValueError on all ranks
    instead of a hang or a silently wrong result."""
    left, right = window if window is not None else (None, None)
    checksum = -1 if bounds is None else zlib.crc32(struct.pack(f"<{len(bounds)}q", *bounds))
    sinks_checksum = -1 if sinks is None else zlib.crc32(sinks.detach().float().cpu().numpy().tobytes())
    mine = [q.shape[0], q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3], _DTYPE_CODES[q.dtype],
            (LAYOUTS + MASK_LAYOUTS).index(layout), int(causal), -1 if left is None else left,
            -1 if right is None else right,
            _bits(scale), _bits(softcap), sinks_checksum, checksum, -1 if mask is None else mask.checksum(),
            TOPOLOGIES.index(topology),
            _local_size_setting()]
    local = torch.tensor(mine, dtype=torch.int64, device=q.device)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(everyone, local, group=group)
    except RuntimeError as error:  # gloo: timeout or connection closed; NCCL: DistBackendError
        from .comm import RingTimeoutError, backend_message, peer_failure_hint
        raise RingTimeoutError(f"ring_attention: rank {dist.get_rank()}: the all-gather of every rank's metadata "
                               f"before the ring (check_peers) did not complete. {peer_failure_hint(group)}. "
                               f"Backend: {backend_message(error)}") from error
    table = torch.stack(everyone).cpu()
    differing = [name for i, name in enumerate(_METADATA_FIELDS) if not torch.all(table[:, i] == table[0, i])]
    if differing:
        rows = {name: table[:, _METADATA_FIELDS.index(name)].tolist() for name in differing}
        raise ValueError(f"ring_attention inputs differ across ranks (values per rank, softmax_scale as raw bits): "
                         f"{rows}; every rank must pass the same shapes, dtype, layout, causal, window, scale, "
                         f"softcap, sinks, cu_seqlens, mask and topology, and see the same {ENV_LOCAL_WORLD_SIZE}")


def ring_attention(q, k, v, causal=False, softmax_scale=None, layout="zigzag", group=None, window=None, *,
                   softcap=None, sinks=None, cu_seqlens=None, mask=None, topology="auto", backend=None,
                   check_peers=True):
    """Exact attention over a sequence sharded across ``group`` (SPMD: every rank calls it). Differentiable.

    q: (batch, local_seqlen, nheads, headdim); k: (batch, local_seqlen, nheads_kv, headdim), v: (batch,
    local_seqlen, nheads_kv, headdim_v): this rank's part of the sequence as ``shard(x, layout, rank,
    world_size)`` gives it. Returns this rank's part of the output, (batch, local_seqlen, nheads, headdim_v).
    ``layout``: "contiguous", "zigzag" or "striped" (see ``dist_attn.layouts``); ``window=(left, right)`` and
    ``causal`` act on global positions.

    ``softcap``: scores become ``softcap * tanh(scores / softcap)`` (Gemma 2; None or 0: off). ``sinks``:
    (nheads,) learnable logits (gpt-oss), one virtual key of value 0 per head that every query sees; it enters
    the global softmax once and gets its gradient (this rank's rows' share, like every weight's).

    Packed variable-length sequences: pass ``cu_seqlens``, the *global* cumulative lengths (int32,
    ``(batch + 1,)``, the same on every rank), and q: (local_tokens, nheads, headdim), k, v:
    (local_tokens, nheads_kv, headdim or headdim_v) as ``shard(x, layout, rank, world_size, cu_seqlens=cu_seqlens)``
    gives them (each sequence padded to a multiple of w, 2w for zigzag; see ``dist_attn.layouts``).
    No token attends to another sequence; padded rows give output 0 and get zero gradients.

    ``mask``: a ``dist_attn.masks.Mask`` over the global sequence (documents, prefix-LM, shared prompt,
    block-sparse, or your own slices), in place of ``causal``/``window``/``cu_seqlens``. Any layout works;
    ``layout="balanced"`` places chunks so that every rank's queries see about as many keys (``shard(x,
    "balanced", rank, world_size, mask=mask)`` gives the local part). Each step launches only the pieces of
    slices the two ranks' rows share, and blocks no rank needs are not sent. Rows that see no key give 0.

    ``topology``: "flat" (one ring over the group), "hierarchical" (K/V circulate on each node's fast
    ring while the next node's blocks arrive over the slow link; see ``dist_attn.topology`` for how nodes
    are found) or "auto" (hierarchical across several multi-rank nodes when every block must travel,
    else flat). Every choice gives the same result up to float32 rounding order.

    ``backend`` is passed to the local kernel. ``check_peers`` compares every rank's metadata with one
    small all-gather before the ring starts (a disagreement raises on all ranks instead of hanging).
    Without an initialised process group it runs as a world of one.
    """
    group = as_group(group)
    check_mask_args(mask, causal, window, cu_seqlens)
    check_layout(layout, mask)
    check_topology(topology)
    if not isinstance(check_peers, bool):
        raise TypeError(f"check_peers must be a bool; got {type(check_peers).__name__}")
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
    _, local_len, _, nheads, _, headdim = check_qkv(q, k, v)
    scale = check_scale(softmax_scale, headdim)
    window = check_window(window)
    softcap = check_softcap(softcap)
    check_sinks(sinks, nheads, q)
    check_causal(causal)
    if k.shape[1] != local_len:
        raise ValueError(f"q and k must hold the same tokens (one sharded sequence): local seqlen of q is "
                         f"{local_len}, of k {k.shape[1]}")
    if bounds is None and layout not in MASK_LAYOUTS:
        check_local_length(layout, local_len)
    if mask is not None and local_len * world_size != mask.seqlen:
        raise ValueError(f"mask covers {mask.seqlen} tokens, but {world_size} ranks of local seqlen {local_len} hold "
                         f"{local_len * world_size}: pass the shard() of a sequence of the mask's length")
    if world_size > 1 and check_peers:
        _check_peers(q, k, v, sinks, causal, scale, layout, window, softcap, group, bounds, mask, topology)
    plan = ring_plan(layout, world_size, local_len, causal, window, bounds, mask)
    nodes = resolve(topology, group, full_ring=plan == (world_size - 1, 0)) if world_size > 1 else None
    out = RingAttnFunc.apply(q, k, v, sinks, causal, scale, layout, group, window, softcap, backend, bounds, plan,
                             nodes, mask)
    return out if bounds is None else out[0]
