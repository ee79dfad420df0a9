"""Which global positions each rank holds: the only module that knows.

A global sequence of ``n`` tokens is split over ``w`` ranks in one of three layouts:

- ``"contiguous"``: rank r holds chunk r of w equal chunks (``n % w == 0``).
- ``"zigzag"``: the sequence is cut into 2w chunks; rank r holds chunks r and 2w-1-r (``n % 2w == 0``).
  Under a causal mask every rank then gets the same amount of work.
- ``"striped"``: token t lives on rank t % w (``n % w == 0``); also balanced under a causal mask.

A rank's local block is a list of ``Segment`` s, each an arithmetic progression of global positions,
which is exactly what the kernel takes (offset and stride): one segment for contiguous and striped,
two for zigzag.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from kernels.positions import Positions

LAYOUTS = ("contiguous", "zigzag", "striped")


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


def check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}")


def chunks_per_rank(layout):
    check_layout(layout)
    return 2 if layout == "zigzag" else 1


def check_local_length(layout, local_len, name="local sequence length"):
    """Every rank holds ``local_len`` tokens; zigzag needs them to split into two equal chunks."""
    if layout == "zigzag" and local_len % 2:
        raise ValueError(f"{name} must be even for layout='zigzag' (two chunks per rank); got {local_len}")


def segments(layout, rank, world_size, local_len):
    """The segments of ``rank``'s local block of ``local_len`` tokens."""
    check_layout(layout)
    check_local_length(layout, local_len)
    if layout == "contiguous":
        return [Segment(0, local_len, rank * local_len, 1)]
    if layout == "striped":
        return [Segment(0, local_len, rank, world_size)]
    half = local_len // 2
    return [Segment(0, half, rank * half, 1), Segment(half, half, (2 * world_size - 1 - rank) * half, 1)]


def global_positions(layout, rank, world_size, local_len, device=None):
    """1-D int64 tensor: the global position of every local row (for tests, RoPE, labels)."""
    return torch.cat([seg.offset + seg.stride * torch.arange(seg.length, device=device)
                      for seg in segments(layout, rank, world_size, local_len)])


def _check_world(rank, world_size):
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1; got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}); got {rank!r}")


def shard(x, layout="zigzag", rank=0, world_size=1, dim=1):
    """This rank's part of the full sequence ``x`` along ``dim``: pure slicing, no communication.

    The sequence length must be a multiple of ``world_size`` (``2 * world_size`` for zigzag).
    Contiguous returns a view; zigzag and striped return a contiguous copy.
    """
    check_layout(layout)
    _check_world(rank, world_size)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    dim = dim % x.dim()
    seqlen = x.shape[dim]
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


def gather(x_local, layout="zigzag", group=None, dim=1):
    """The full sequence from every rank's local part (all-gather along ``dim``, then reorder).

    A collective: every rank of ``group`` must call it. Not differentiable. Without an initialised
    process group it is the identity (world size 1).
    """
    check_layout(layout)
    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local must be a torch.Tensor; got {type(x_local).__name__}")
    dim = dim % x_local.dim()
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if world_size == 1:
        return x_local
    parts = [torch.empty_like(x_local) for _ in range(world_size)]
    dist.all_gather(parts, x_local.contiguous(), group=group)
    if layout == "striped":  # token t = i * w + r sits at row i of rank r
        return torch.stack(parts, dim=dim + 1).flatten(dim, dim + 1)
    local_len = x_local.shape[dim]
    pieces = {}
    for rank, part in enumerate(parts):
        for seg in segments(layout, rank, world_size, local_len):
            pieces[seg.offset] = part.narrow(dim, seg.start, seg.length)
    return torch.cat([pieces[offset] for offset in sorted(pieces)], dim=dim)
