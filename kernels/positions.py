"""Global positions of a block and which part of another block they can see.

A block of ``length`` rows sits at positions ``offset + i * stride``. That one rule expresses
contiguous chunks (stride 1), zigzag halves (two stride-1 blocks) and striped layouts (stride w).

Causal masking and sliding windows reduce to one band: key position ``kp`` is visible from query
position ``qp`` iff ``qp - below <= kp <= qp + above`` (see ``mask_band``). The Triton kernels and the
torch backend both use the band to visit only the tiles that intersect it and to mask only the
tiles that it cuts.
"""

from __future__ import annotations

from typing import NamedTuple


class Positions(NamedTuple):
    offset: int
    stride: int
    length: int

    def at(self, index):
        return self.offset + index * self.stride

    @property
    def first(self):
        return self.offset

    @property
    def last(self):
        return self.at(max(self.length - 1, 0))


def mask_band(causal, window, q: Positions, k: Positions):
    """``(below, above)``: key kp is visible from query qp iff ``qp - below <= kp <= qp + above``.

    An unlimited side becomes the widest distance the two blocks can show, so the kernels can do
    plain int32 arithmetic instead of carrying infinities.
    """
    span = max(q.last - k.first, k.last - q.first, 0) + 1
    left, right = window if window is not None else (None, None)
    below = span if left is None else min(left, span)
    above = span if right is None else min(right, span)
    if causal:
        above = min(above, 0)
    return below, above


def visible_range(a_first, a_last, b: Positions, below, above):
    """Index range ``[start, end)`` of block b visible from some position in ``[a_first, a_last]``.

    Visible means ``a - below <= b_pos <= a + above``; empty ranges come back with ``end <= start``.
    """
    start = max(0, -((b.offset - (a_first - below)) // b.stride))  # ceil((a_first - below - offset) / stride)
    end = min(b.length, (a_last + above - b.offset) // b.stride + 1)
    return start, end


def fully_visible(a_first, a_last, b_first, b_last, below, above):
    """Every pair (a in [a_first, a_last], b in [b_first, b_last]) lies inside the band."""
    return b_first >= a_last - below and b_last <= a_first + above


class PackedPair(NamedTuple):
    """One sequence of a packed (variable-length) call: query rows ``[q_start, q_start + q.length)``
    at positions ``q``, key rows ``[k_start, k_start + k.length)`` at positions ``k``, and their band."""
    q_start: int
    q: Positions
    k_start: int
    k: Positions
    below: int
    above: int

    @property
    def q_rows(self):
        return slice(self.q_start, self.q_start + self.q.length)

    @property
    def k_rows(self):
        return slice(self.k_start, self.k_start + self.k.length)
