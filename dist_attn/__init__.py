"""Exact attention over sequences sharded across the ranks of a process group (ring attention).

``shard``/``gather`` place a sequence on the ranks (layouts "contiguous", "zigzag", "striped");
``ring_attention`` runs attention over the whole sequence with each rank holding its part. See
shared/DESIGN.md for the design; ``kernels`` holds the single-device kernel every ring step runs.
"""

from .layouts import LAYOUTS, gather, global_positions, shard
from .ring import ring_attention

__all__ = ["LAYOUTS", "gather", "global_positions", "ring_attention", "shard"]
