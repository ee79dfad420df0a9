"""Adapters that plug ``dist_attn`` into other frameworks. Each submodule imports its framework only
when imported itself, so ``import dist_attn`` never needs them.

- ``dist_attn.integrations.deepspeed``: ``RingAttention`` as the local attention of DeepSpeed-Ulysses'
  ``DistributedAttention`` (hybrid Ulysses x ring inside DeepSpeed) and ``shard_batch``.
"""
