"""Exact attention over sequences sharded across the ranks of a process group (ring attention).

``shard``/``gather`` place a sequence on the ranks (layouts "contiguous", "zigzag", "striped");
``ring_attention`` runs attention over the whole sequence with each rank holding its part;
``usp_attention`` adds Ulysses all-to-all head sharding inside groups of adjacent ranks;
``context_parallel`` routes PyTorch SDPA calls on sharded tensors to the ring. See
docs/design.md for the design; ``dist_attn.kernels`` holds the single-device kernel every ring step runs.
"""

from .checkpointing import checkpoint, checkpoint_layer
from .layouts import LAYOUTS, gather, global_positions, shard
from .loss import linear_cross_entropy
from .ring import ring_attention
from .sdpa import context_parallel
from .ulysses import heads_to_seq, seq_to_heads, usp_attention, usp_gather, usp_positions, usp_shard

__all__ = ["LAYOUTS", "checkpoint", "checkpoint_layer", "context_parallel", "gather", "global_positions",
           "heads_to_seq", "linear_cross_entropy", "ring_attention", "seq_to_heads", "shard", "usp_attention",
           "usp_gather", "usp_positions", "usp_shard"]
