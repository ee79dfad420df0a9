"""Exact attention over sequences sharded across the ranks of a process group (ring attention).

The distributed layer (layouts, ring communication, merge, ring autograd) builds on ``kernels``;
see shared/DESIGN.md. For now this package only re-exports the single-device kernel.
"""

from kernels import attention_reference, flash_attn_func

__all__ = ["attention_reference", "flash_attn_func"]
