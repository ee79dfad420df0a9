"""Mask descriptions: which (query, key) pairs of a global sequence are visible, as a list of slices.

A ``MaskSlice(q_start, q_end, k_start, k_end, below, above)`` makes key position ``kp`` visible from query
position ``qp`` when ``q_start <= qp < q_end``, ``k_start <= kp < k_end`` and ``qp - below <= kp <= qp +
above`` (the kernels' band; ``None`` is an unlimited side). Full, causal (``above=0``), sliding-window and
inverse-causal (``below=0``) blocks are all bands, so every mask below is a short list of them:

- ``causal(seqlen)``, ``window(seqlen, left, right)``;
- ``documents(cu_seqlens, causal=True, window=None)``: packed documents, no pair across two of them;
- ``prefix_lm(prefix_lens, cu_seqlens)``: per document a bidirectional prefix, the rest causal;
- ``shared_prompt(prompt_len, response_lens)``: one causal prompt, then responses that see all of the prompt
  and, causally, themselves (RL with grouped samples);
- ``block_sparse(block_mask, block_size, seqlen=None)``: FlashAttention's block-sparse form, a boolean
  (query blocks x key blocks) matrix.

No pair may be visible in two slices (the softmax would count it twice): ``Mask`` refuses overlaps, ranges out
of bounds and empty bands. ``row_counts`` gives the exact number of visible keys of every query row, which is
the work of that row in any attention kernel; ``rank_work`` and ``balanced_dispatch`` turn it into per-rank
work for a layout, and an assignment of sequence chunks to ranks that balances it (greedy, largest chunk first
onto the least-loaded rank, as MagiAttention's dispatch solver does); ``dispatch_for`` is the one
``layout="balanced"`` uses.

Running a mask: ``slice_pairs`` cuts every slice by the local rows of a query and a key block into the kernels'
``PackedPair`` s (what ``ring_attention(..., mask=)`` launches at each ring step), and ``check_mask_args`` refuses
a mask together with causal, window or cu_seqlens.
"""

from __future__ import annotations

import functools
import heapq
import struct
import zlib
from typing import NamedTuple

import torch

from dist_attn.kernels.varlen import check_cu_seqlens
from dist_attn.kernels.positions import PackedPair, Positions, visible_range
from dist_attn.layouts import check_layout, chunks_per_rank, global_positions


class MaskSlice(NamedTuple):
    q_start: int
    q_end: int
    k_start: int
    k_end: int
    below: int | None = None
    above: int | None = None


def _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def _band_count(q_start, q_end, k_start, k_end, below, above):
    """Visible pairs of one band inside the rectangle [q_start, q_end) x [k_start, k_end), exactly."""
    if q_end <= q_start or k_end <= k_start:
        return torch.zeros(0, dtype=torch.int64)
    q = torch.arange(q_start, q_end, dtype=torch.int64)
    lo = q - below if below is not None else torch.full_like(q, k_start)
    hi = q + above if above is not None else torch.full_like(q, k_end - 1)
    return (hi.clamp(max=k_end - 1) - lo.clamp(min=k_start) + 1).clamp(min=0)


def _min_side(a, b):
    if a is None:
        return b
    return a if b is None else min(a, b)


class Mask:
    """A validated list of ``MaskSlice`` s over a sequence of ``seqlen`` tokens (see the module docstring)."""

    def __init__(self, seqlen, slices):
        if not _is_int(seqlen) or seqlen < 1:
            raise ValueError(f"seqlen must be an int >= 1; got {seqlen!r}")
        if not isinstance(slices, (list, tuple)):
            raise TypeError(f"slices must be a list of MaskSlice; got {type(slices).__name__}")
        checked = []
        for i, s in enumerate(slices):
            if not isinstance(s, (tuple, list)) or len(s) != 6:
                raise TypeError(f"slices[{i}] must be a MaskSlice (q_start, q_end, k_start, k_end, below, above); "
                                f"got {s!r}")
            s = MaskSlice(*s)
            if not all(_is_int(x) for x in s[:4]) or not all(x is None or _is_int(x) for x in s[4:]):
                raise TypeError(f"slices[{i}] = {tuple(s)}: ranges must be ints and below/above ints or None")
            if not (0 <= s.q_start < s.q_end <= seqlen and 0 <= s.k_start < s.k_end <= seqlen):
                raise ValueError(f"slices[{i}] = {tuple(s)}: ranges must be non-empty and inside [0, {seqlen})")
            if int(_band_count(*s).sum()) == 0:
                raise ValueError(f"slices[{i}] = {tuple(s)}: its band leaves no visible pair in its ranges")
            checked.append(s)
        self.seqlen, self.slices = seqlen, tuple(checked)
        self._check_overlaps()
        self._hash = hash((seqlen, self.slices))  # masks key the ring's caches, once per step

    def _check_overlaps(self):
        order = sorted(range(len(self.slices)), key=lambda i: self.slices[i].q_start)
        for n, i in enumerate(order):
            a = self.slices[i]
            for j in order[n + 1:]:
                b = self.slices[j]
                if b.q_start >= a.q_end:
                    break
                rect = (b.q_start, min(a.q_end, b.q_end), max(a.k_start, b.k_start), min(a.k_end, b.k_end))
                if int(_band_count(*rect, _min_side(a.below, b.below), _min_side(a.above, b.above)).sum()):
                    raise ValueError(f"slices overlap: {tuple(a)} and {tuple(b)} make some (query, key) pair "
                                     f"visible twice")

    def __repr__(self):
        return f"Mask(seqlen={self.seqlen}, {len(self.slices)} slices)"

    def __eq__(self, other):
        return isinstance(other, Mask) and (self.seqlen, self.slices) == (other.seqlen, other.slices)

    def __hash__(self):
        return self._hash

    def checksum(self):
        """crc32 of the length and every slice (None as -2**62): equal on ranks that hold equal masks."""
        values = [self.seqlen] + [-(2 ** 62) if x is None else x for s in self.slices for x in s]
        return zlib.crc32(struct.pack(f"<{len(values)}q", *values))

    def dense(self):
        """The (seqlen, seqlen) boolean matrix, True where the key (column) is visible from the query (row)."""
        visible = torch.zeros(self.seqlen, self.seqlen, dtype=torch.bool)
        for s in self.slices:
            diff = torch.arange(s.q_start, s.q_end)[:, None] - torch.arange(s.k_start, s.k_end)[None, :]  # qp - kp
            band = torch.ones_like(diff, dtype=torch.bool)
            if s.below is not None:
                band &= diff <= s.below
            if s.above is not None:
                band &= diff >= -s.above
            visible[s.q_start:s.q_end, s.k_start:s.k_end] |= band
        return visible

    def row_counts(self):
        """int64 (seqlen,): the number of keys every query row sees (its work in any attention kernel)."""
        counts = torch.zeros(self.seqlen, dtype=torch.int64)
        for s in self.slices:
            counts[s.q_start:s.q_end] += _band_count(*s)
        return counts

    def pairs(self):
        """The number of visible (query, key) pairs."""
        return int(self.row_counts().sum())


def _bounds(cu_seqlens):
    """``cu_seqlens`` (an int32 tensor, or a list of ints) checked by the kernels' rule, as a list."""
    if not isinstance(cu_seqlens, torch.Tensor):
        if not isinstance(cu_seqlens, (list, tuple)) or not all(_is_int(b) for b in cu_seqlens):
            raise TypeError(f"cu_seqlens must be an int32 tensor or a list of ints; got {cu_seqlens!r}")
        cu_seqlens = torch.tensor(cu_seqlens, dtype=torch.int32)
    return check_cu_seqlens("cu_seqlens", cu_seqlens, None)


def causal(seqlen):
    return Mask(seqlen, [MaskSlice(0, seqlen, 0, seqlen, None, 0)])


def window(seqlen, left, right):
    """``qp - left <= kp <= qp + right`` (None: unlimited); ``window(n, w - 1, 0)`` is a causal sliding window."""
    return Mask(seqlen, [MaskSlice(0, seqlen, 0, seqlen, left, right)])


def documents(cu_seqlens, causal=True, window=None):
    """Packed documents (``cu_seqlens``: cumulative lengths); inside each, causal and/or ``window=(left, right)``."""
    bounds = _bounds(cu_seqlens)
    left, right = window if window is not None else (None, None)
    above = _min_side(right, 0) if causal else right
    return Mask(bounds[-1], [MaskSlice(a, b, a, b, left, above) for a, b in zip(bounds, bounds[1:]) if b > a])


def prefix_lm(prefix_lens, cu_seqlens):
    """Per document i: its first ``prefix_lens[i]`` tokens see each other both ways, the rest causally."""
    bounds = _bounds(cu_seqlens)
    if len(prefix_lens) != len(bounds) - 1:
        raise ValueError(f"prefix_lens must have one entry per document ({len(bounds) - 1}); got {len(prefix_lens)}")
    slices = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        p = prefix_lens[i]
        if not _is_int(p) or not 0 <= p <= b - a:
            raise ValueError(f"prefix_lens[{i}] must be an int between 0 and the document's length {b - a}; got {p!r}")
        if p:
            slices.append(MaskSlice(a, a + p, a, a + p, None, None))
        if a + p < b:
            slices.append(MaskSlice(a + p, b, a, b, None, 0))
    return Mask(bounds[-1], slices)


def shared_prompt(prompt_len, response_lens):
    """A causal prompt of ``prompt_len`` tokens, then responses: each sees the whole prompt and itself causally,
    never another response."""
    if not _is_int(prompt_len) or prompt_len < 1:
        raise ValueError(f"prompt_len must be an int >= 1; got {prompt_len!r}")
    if not response_lens or any(not _is_int(n) or n < 1 for n in response_lens):
        raise ValueError(f"response_lens must be a non-empty list of ints >= 1; got {response_lens!r}")
    slices, start = [MaskSlice(0, prompt_len, 0, prompt_len, None, 0)], prompt_len
    for n in response_lens:
        slices += [MaskSlice(start, start + n, 0, prompt_len), MaskSlice(start, start + n, start, start + n, None, 0)]
        start += n
    return Mask(start, slices)


def block_sparse(block_mask, block_size, seqlen=None):
    """``block_mask[i, j]`` True: query block i sees key block j entirely (blocks of ``block_size`` tokens; the
    last one may be shorter when ``seqlen`` is not a multiple). Runs of True blocks in a row become one slice."""
    if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask must be a torch.bool tensor; got "
                        f"{block_mask.dtype if isinstance(block_mask, torch.Tensor) else type(block_mask).__name__}")
    if block_mask.dim() != 2 or block_mask.shape[0] != block_mask.shape[1]:
        raise ValueError(f"block_mask must be square (query blocks x key blocks of one sequence); got shape "
                         f"{tuple(block_mask.shape)}")
    if not _is_int(block_size) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1; got {block_size!r}")
    blocks = block_mask.shape[0]
    seqlen = blocks * block_size if seqlen is None else seqlen
    if not _is_int(seqlen) or not (blocks - 1) * block_size < seqlen <= blocks * block_size:
        raise ValueError(f"seqlen must lie in ({(blocks - 1) * block_size}, {blocks * block_size}] for {blocks} blocks "
                         f"of {block_size}; got {seqlen!r}")
    end = lambda i: min((i + 1) * block_size, seqlen)  # noqa: E731
    slices = []
    for i, row in enumerate(block_mask.tolist()):
        j = 0
        while j < blocks:
            if row[j]:
                first = j
                while j < blocks and row[j]:
                    j += 1
                slices.append(MaskSlice(i * block_size, end(i), first * block_size, end(j - 1)))
            j += 1
    return Mask(seqlen, slices)


# ------------------------------------------------------------------------------------------- dispatch

def rank_work(mask, layout, world_size):
    """Visible pairs per rank (a list) when rank r holds the queries of ``layout`` (contiguous, zigzag, striped)
    or of a ``Dispatch``."""
    counts = mask.row_counts()
    if isinstance(layout, Dispatch):
        return [int(counts[layout.positions(r)].sum()) for r in range(world_size)]
    check_layout(layout, mask)
    if layout == "balanced":
        return rank_work(mask, dispatch_for(mask, world_size), world_size)
    if mask.seqlen % (world_size * chunks_per_rank(layout)):
        raise ValueError(f"seqlen {mask.seqlen} must be a multiple of {world_size * chunks_per_rank(layout)} for "
                         f"layout={layout!r} over {world_size} ranks")
    return [int(counts[global_positions(layout, r, world_size, mask.seqlen // world_size)].sum())
            for r in range(world_size)]


class Dispatch(NamedTuple):
    """Sequence chunks ``[c * chunk_size, (c + 1) * chunk_size)`` per rank: ``chunks[r]``, ascending."""
    chunk_size: int
    chunks: tuple

    def positions(self, rank):
        """int64 global positions of rank ``rank``'s rows, in local order."""
        return torch.cat([torch.arange(c * self.chunk_size, (c + 1) * self.chunk_size) for c in self.chunks[rank]])


def balanced_dispatch(mask, world_size, chunks_per_rank=16):
    """Assigns the ``world_size * chunks_per_rank`` equal chunks of the sequence to ranks, ``chunks_per_rank``
    each, balancing the visible pairs of their queries: chunks by decreasing cost, each onto the rank with the
    least work among those with room (a min-heap). The sequence length must split into those chunks."""
    if not _is_int(world_size) or world_size < 1 or not _is_int(chunks_per_rank) or chunks_per_rank < 1:
        raise ValueError(f"world_size and chunks_per_rank must be ints >= 1; got {world_size!r}, {chunks_per_rank!r}")
    total_chunks = world_size * chunks_per_rank
    if mask.seqlen % total_chunks:
        raise ValueError(f"seqlen {mask.seqlen} must be a multiple of world_size x chunks_per_rank = {total_chunks}")
    chunk_size = mask.seqlen // total_chunks
    costs = mask.row_counts().view(total_chunks, chunk_size).sum(1).tolist()
    heap = [(0, r) for r in range(world_size)]
    assigned = [[] for _ in range(world_size)]
    for c in sorted(range(total_chunks), key=lambda c: (-costs[c], c)):
        load, r = heapq.heappop(heap)
        assigned[r].append(c)
        if len(assigned[r]) < chunks_per_rank:
            heapq.heappush(heap, (load + costs[c], r))
    return Dispatch(chunk_size, tuple(tuple(sorted(a)) for a in assigned))


def imbalance(work):
    """max / mean of per-rank work (1.0: perfectly balanced)."""
    mean = sum(work) / len(work)
    return max(work) / mean if mean else 1.0


MIN_CHUNK = 16  # tokens: fewer make more kernel pairs than the balance is worth


@functools.lru_cache(maxsize=64)
def dispatch_for(mask, world_size):
    """The ``Dispatch`` of ``layout="balanced"``: ``balanced_dispatch`` with the most chunks per rank, up to 16,
    that split the sequence evenly into chunks of at least ``MIN_CHUNK`` tokens (1 if none does). The same on
    every rank: a pure function of the mask and the world size."""
    if not _is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1; got {world_size!r}")
    if mask.seqlen % world_size:
        raise ValueError(f"layout='balanced' needs the sequence length ({mask.seqlen}) to be a multiple of the "
                         f"world size ({world_size})")
    per_rank = max([c for c in range(1, 17) if mask.seqlen % (world_size * c) == 0
                    and mask.seqlen // (world_size * c) >= MIN_CHUNK] or [1])
    return balanced_dispatch(mask, world_size, per_rank)


def check_mask_args(mask, causal, window, cu_seqlens):
    """A mask says which pairs are visible by itself: causal, window and cu_seqlens would say it twice."""
    if mask is None:
        return
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be a dist_attn.masks.Mask; got {type(mask).__name__}")
    given = [name for name, value in (("causal", causal is not False), ("window", window is not None),
                                      ("cu_seqlens", cu_seqlens is not None)) if value]
    if given:
        raise ValueError(f"mask= describes every visible pair: do not also pass {', '.join(given)} "
                         f"(build them into the mask: dist_attn.masks.causal, window, documents)")


# ------------------------------------------------------------------------------------ kernel pairs

def _index_range(segment, lo, hi):
    """Indices i of ``segment`` (positions offset + i * stride) with lo <= position < hi: [start, end)."""
    start = max(0, -((segment.offset - lo) // segment.stride))
    end = min(segment.length, -((segment.offset - hi) // segment.stride))
    return start, end


def _finite(side, span):
    return span if side is None else min(side, span)


def slice_pairs(mask, q_segments, k_segments):
    """The kernel's ``PackedPair`` s of ``mask`` between local query rows and local key rows.

    ``q_segments``, ``k_segments``: ``dist_attn.layouts.Segment`` s (local rows at global positions). Every
    (slice, query segment, key segment) whose rectangle holds a visible pair becomes one pair, with the slice's
    band made finite (the kernels do int32 arithmetic)."""
    pairs = []
    for qs in q_segments:
        for ks in k_segments:
            for s in mask.slices:
                q_lo, q_hi = _index_range(qs, s.q_start, s.q_end)
                k_lo, k_hi = _index_range(ks, s.k_start, s.k_end)
                if q_hi <= q_lo or k_hi <= k_lo:
                    continue
                qpos = Positions(qs.offset + q_lo * qs.stride, qs.stride, q_hi - q_lo)
                kpos = Positions(ks.offset + k_lo * ks.stride, ks.stride, k_hi - k_lo)
                span = max(qpos.last - kpos.first, kpos.last - qpos.first, 0) + 1
                below, above = _finite(s.below, span), _finite(s.above, span)
                start, end = visible_range(qpos.first, qpos.last, kpos, below, above)
                if end > start:
                    pairs.append(PackedPair(qs.start + q_lo, qpos, ks.start + k_lo, kpos, below, above))
    return pairs
