"""Which global positions each rank holds: the only module that knows.

A global sequence of ``n`` tokens is split over ``w`` ranks in one of three layouts:

- ``"contiguous"``: rank r holds chunk r of w equal chunks (``n % w == 0``).
- ``"zigzag"``: the sequence is cut into 2w chunks; rank r holds chunks r and 2w-1-r (``n % 2w == 0``).
  Under a causal mask every rank then gets the same amount of work.
- ``"striped"``: token t lives on rank t % w (``n % w == 0``); also balanced under a causal mask.
- ``"balanced"``: for a ``dist_attn.masks.Mask`` (pass ``mask=``), equal chunks assigned so that every rank's
  queries see about as many keys (``masks.dispatch_for``; ``n % w == 0``). Rank r holds its chunks in order.

A rank's local block is a list of ``Segment`` s, each an arithmetic progression of global positions,
which is exactly what the kernel takes (offset and stride): one segment for contiguous and striped,
two for zigzag.

Packed variable-length sequences (``cu_seqlens``, the global cumulative lengths, int32, same on every
rank) are laid out sequence by sequence with the same rule. Padding rule: sequence i of length L_i is
padded at its end to P_i, the next multiple of w (2w for zigzag), so that it splits into equal pieces;
every rank holds P_i / w rows of it, and padded rows are zeros that the ring masks out (no query sees a
padded key; padded query rows give output 0 and zero gradients). No sequence needs to be divisible by
anything, and the padding is at most w - 1 (2w - 1) tokens per sequence. The local block is a list of
``PackedSegment`` s: for zigzag, first chunk r of every sequence, then chunk 2w-1-r of every sequence.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.distributed as dist

from dist_attn.comm import as_group
from dist_attn.kernels.positions import Positions
from dist_attn.kernels.varlen import check_cu_seqlens  # kernels owns the cu_seqlens rules

LAYOUTS = ("contiguous", "zigzag", "striped")
MASK_LAYOUTS = ("balanced",)  # need the mask they balance (``mask=``)


class Segment(NamedTuple):
    """Local rows ``[start, start + length)`` sit at global positions ``offset + i * stride``."""
    start: int
    length: int
    offset: int
    stride: int

    @property
    def rows(self):
        return slice(self.start, self.start + self.length)

    @property
    def positions(self):
        return Positions(self.offset, self.stride, self.length)


class PackedSegment(NamedTuple):
    """Local rows ``[start, start + length)``: one piece of every packed sequence, at stride ``stride``.

    ``spans[i] = (row, valid, offset)``: the piece of sequence i starts at segment row ``row`` and its
    first ``valid`` rows sit at positions ``offset + j * stride`` of that sequence (the kernel's spans);
    ``slots[i]`` rows belong to it, the rest being padding.
    """
    start: int
    length: int
    stride: int
    spans: tuple
    slots: tuple

    @property
    def rows(self):
        return slice(self.start, self.start + self.length)


def check_layout(layout, mask=None):
    """One of LAYOUTS, or of MASK_LAYOUTS when a mask is given."""
    if layout in MASK_LAYOUTS and mask is None:
        raise ValueError(f"layout={layout!r} assigns chunks for a mask: pass mask= (a dist_attn.masks.Mask) to the "
                         "calls that take one (ring_attention, shard, gather, global_positions, hf.shard_inputs)")
    if layout not in LAYOUTS + MASK_LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS + MASK_LAYOUTS}; got {layout!r}")


def chunks_per_rank(layout):
    """Chunks of the sequence each rank holds under ``layout`` (one of LAYOUTS)."""
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def check_local_length(layout, local_len, name="local sequence length"):
    """Every rank holds ``local_len`` tokens; zigzag needs them to split into two equal chunks."""
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"{name} must be even for layout='zigzag' (two chunks per rank); got {local_len}")


def segments(layout, rank, world_size, local_len, mask=None):
    """The segments of ``rank``'s local block of ``local_len`` tokens (``mask``: for layout="balanced")."""
    check_layout(layout, mask)
    if layout == "balanced":
        return _balanced_segments(mask, rank, world_size, local_len)
    check_local_length(layout, local_len)
    if layout == "contiguous":
        return [Segment(0, local_len, rank * local_len, 1)]
    if layout == "striped":
        return [Segment(0, local_len, rank, world_size)]
    half = local_len // 2
    return [Segment(0, half, rank * half, 1), Segment(half, half, (2 * world_size - 1 - rank) * half, 1)]


def _balanced_segments(mask, rank, world_size, local_len):
    """The rank's chunks of ``masks.dispatch_for(mask, world_size)``, adjacent chunks as one segment."""
    from dist_attn.masks import dispatch_for  # masks builds on this module
    if local_len * world_size != mask.seqlen:
        raise ValueError(f"layout='balanced': {world_size} ranks of {local_len} tokens hold {local_len * world_size}, "
                         f"but the mask covers {mask.seqlen}")
    dispatch = dispatch_for(mask, world_size)
    result, row = [], 0
    for chunk in dispatch.chunks[rank]:
        offset = chunk * dispatch.chunk_size
        if result and result[-1].offset + result[-1].length == offset:
            result[-1] = result[-1]._replace(length=result[-1].length + dispatch.chunk_size)
        else:
            result.append(Segment(row, dispatch.chunk_size, offset, 1))
        row += dispatch.chunk_size
    return result


def padded_seqlens(bounds, layout, world_size):
    """Length of every packed sequence after padding to a multiple of w (2w for zigzag)."""
    multiple = world_size * chunks_per_rank(layout)
    return [-(-(end - start) // multiple) * multiple for start, end in zip(bounds, bounds[1:])]


@functools.lru_cache(maxsize=1024)
def packed_segments(layout, rank, world_size, bounds):
    """The ``PackedSegment`` s of ``rank`` for packed sequences with cumulative lengths ``bounds`` (a
    tuple; cached, since every ring step asks again)."""
    check_layout(layout)
    lengths = [end - start for start, end in zip(bounds, bounds[1:])]
    padded = padded_seqlens(bounds, layout, world_size)
    if layout == "zigzag":
        chunks = (rank, 2 * world_size - 1 - rank)
    else:
        chunks = (rank,)
    result, start = [], 0
    for chunk in chunks:
        spans, slots, row = [], [], 0
        for length, full in zip(lengths, padded):
            piece = full // (world_size * len(chunks))
            if layout == "striped":  # positions rank + j * w below length
                offset, valid = rank, min(max(0, -(-(length - rank) // world_size)), piece)
            else:
                offset = chunk * piece
                valid = min(max(length - offset, 0), piece)
            spans.append((row, valid, offset))
            slots.append(piece)
            row += piece
        result.append(PackedSegment(start, row, world_size if layout == "striped" else 1, tuple(spans), tuple(slots)))
        start += row
    return tuple(result)


def packed_local_length(bounds, layout, world_size):
    """Rows each rank holds for packed sequences ``bounds`` (the same on every rank)."""
    return sum(padded_seqlens(bounds, layout, world_size)) // world_size


def _packed_rows(layout, rank, world_size, bounds):
    """(row of the global packed tensor or -1 for padding, position in its sequence) of every local row."""
    rows, positions = [], []
    for seg in packed_segments(layout, rank, world_size, tuple(bounds)):
        for seq_start, (_, valid, offset), slot in zip(bounds, seg.spans, seg.slots):
            pos = offset + seg.stride * torch.arange(slot)
            rows.append(torch.where(torch.arange(slot) < valid, seq_start + pos, -1))
            positions.append(pos)
    empty = torch.zeros(0, dtype=torch.int64)
    return torch.cat(rows or [empty]), torch.cat(positions or [empty])


def _bounds(cu_seqlens):
    return check_cu_seqlens("cu_seqlens", cu_seqlens, None)


def _check_packed_layout(layout, cu_seqlens):
    if cu_seqlens is not None and layout in MASK_LAYOUTS:
        raise ValueError(f"layout={layout!r} does not take cu_seqlens: describe the documents in the mask "
                         "(dist_attn.masks.documents) and pass mask=")


def global_positions(layout, rank, world_size, local_len=None, device=None, *, cu_seqlens=None, mask=None):
    """1-D int64 tensor: the global position of every local row (for tests, RoPE, labels).

    With ``cu_seqlens`` (packed sequences): the position of each row inside its own sequence, padding
    rows included (they continue their sequence's positions); ``local_len`` is then not needed.
    ``mask``: the mask of layout="balanced" (``local_len`` defaults to its length / world_size there).
    """
    check_layout(layout, mask)
    _check_packed_layout(layout, cu_seqlens)
    _check_world(rank, world_size)
    if cu_seqlens is not None:
        return _packed_rows(layout, rank, world_size, _bounds(cu_seqlens))[1].to(device)
    if local_len is None and mask is not None:
        local_len = mask.seqlen // world_size
    if isinstance(local_len, bool) or not isinstance(local_len, int) or local_len < 0:
        raise ValueError(f"local_len must be an int >= 0 (or pass cu_seqlens); got {local_len!r}")
    return torch.cat([seg.offset + seg.stride * torch.arange(seg.length, device=device)
                      for seg in segments(layout, rank, world_size, local_len, mask)])


def _check_world(rank, world_size):
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1; got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}); got {rank!r}")


def _check_dim(dim, x, name):
    """``dim`` an int in ``[-x.dim(), x.dim())``; returns it non-negative."""
    if x.dim() == 0:
        raise ValueError(f"{name} must have a sequence dimension; got a 0-d tensor")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int in [{-x.dim()}, {x.dim()}) for {name} of shape {tuple(x.shape)}; "
                         f"got {dim!r}")
    return dim % x.dim()


def shard(x, layout="zigzag", rank=0, world_size=1, dim=None, *, cu_seqlens=None, mask=None):
    """This rank's part of the full sequence ``x`` along ``dim``: pure slicing, no communication.

    The sequence length must be a multiple of ``world_size`` (``2 * world_size`` for zigzag).
    Contiguous returns a view; zigzag and striped return a contiguous copy. ``dim`` defaults to 1
    (``(batch, seqlen, ...)``), or to 0 with ``cu_seqlens``: then ``x`` holds packed sequences along
    ``dim`` and each one is padded and split by the rule in the module docstring (no divisibility needed).
    ``mask``: the ``dist_attn.masks.Mask`` that layout="balanced" balances (of x's sequence length).
    """
    check_layout(layout, mask)
    _check_packed_layout(layout, cu_seqlens)
    _check_world(rank, world_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    dim = _check_dim((1 if cu_seqlens is None else 0) if dim is None else dim, x, "x")
    if cu_seqlens is not None:
        bounds = _bounds(cu_seqlens)
        if bounds[-1] != x.shape[dim]:
            raise ValueError(f"cu_seqlens[-1] ({bounds[-1]}) must equal the packed length of x along dim {dim} "
                             f"({x.shape[dim]})")
        rows, _ = _packed_rows(layout, rank, world_size, bounds)
        local = x.index_select(dim, rows.clamp(min=0).to(x.device))
        keep = (rows >= 0).to(x.device).view([-1 if d == dim else 1 for d in range(x.dim())])
        return torch.where(keep, local, torch.zeros_like(local))
    seqlen = x.shape[dim]
    if layout in MASK_LAYOUTS:
        if seqlen != mask.seqlen:
            raise ValueError(f"sequence length (dim {dim} of x, {seqlen}) must equal the mask's ({mask.seqlen})")
        return torch.cat([x.narrow(dim, seg.offset, seg.length)
                          for seg in segments(layout, rank, world_size, seqlen // world_size, mask)], dim=dim)
    multiple = world_size * chunks_per_rank(layout)
    if seqlen % multiple:
        raise ValueError(f"sequence length (dim {dim} of x, {seqlen}) must be a multiple of {multiple} for "
                         f"layout={layout!r} with world_size={world_size}")
    local_len = seqlen // world_size
    if layout == "striped":
        index = (slice(None),) * dim + (slice(rank, None, world_size),)
        return x[index].contiguous()
    return torch.cat([x.narrow(dim, seg.offset, seg.length)
                      for seg in segments(layout, rank, world_size, local_len)], dim=dim)


def gather(x_local, layout="zigzag", group=None, dim=None, *, cu_seqlens=None, mask=None):
    """The full sequence from every rank's local part (all-gather along ``dim``, then reorder).

    A collective: every rank of ``group`` must call it. Not differentiable. Without an initialised
    process group it is the identity (world size 1), except that packed sequences (``cu_seqlens``,
    ``dim`` default 0) always lose their padding rows. ``mask``: that of layout="balanced".
    """
    group = as_group(group)
    check_layout(layout, mask)
    _check_packed_layout(layout, cu_seqlens)
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor; got {type(x_local).__name__}")
    dim = _check_dim((1 if cu_seqlens is None else 0) if dim is None else dim, x_local, "x_local")
    if group is not None and not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialised")
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if cu_seqlens is not None:
        return _gather_packed(x_local, layout, group, dim, world_size, _bounds(cu_seqlens))
    if world_size == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    if layout == "striped":  # token t = i * w + r sits at row i of rank r
        return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)
    local_len = x_local.shape[dim]
    pieces = {}
    for rank, part in enumerate(parts):
        for seg in segments(layout, rank, world_size, local_len, mask):
            pieces[seg.offset] = part.narrow(dim, seg.start, seg.length)
    return torch.cat([pieces[offset] for offset in sorted(pieces)], dim=dim)


def _gather_packed(x_local, layout, group, dim, world_size, bounds):
    expected = packed_local_length(bounds, layout, world_size)
    if x_local.shape[dim] != expected:
        raise ValueError(f"x_local holds {x_local.shape[dim]} rows along dim {dim}; packed sequences cu_seqlens "
                         f"give every rank {expected} rows for layout={layout!r} and world_size={world_size}")
    parts = [x_local] if world_size == 1 else [torch.empty_like(x_local) for _ in range(world_size)]
    if world_size > 1:
        dist.all_gather(parts, x_local.contiguous(), group=group)
    full_shape = list(x_local.shape)
    full_shape[dim] = bounds[-1]
    full = x_local.new_zeros(full_shape)
    for rank, part in enumerate(parts):
        rows, _ = _packed_rows(layout, rank, world_size, bounds)
        kept = (rows >= 0).nonzero().flatten().to(part.device)
        full.index_copy_(dim, rows[rows >= 0].to(part.device), part.index_select(dim, kept))
    return full
