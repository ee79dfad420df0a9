"""Single-device attention: Triton flash-attention kernels, a chunked PyTorch path and a reference."""

from .interface import FlashAttnFunc, flash_attn_backward, flash_attn_forward, flash_attn_func
from .reference import attention_reference

__all__ = ["FlashAttnFunc", "attention_reference", "flash_attn_backward", "flash_attn_forward", "flash_attn_func"]
