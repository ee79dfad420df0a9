"""Single-device attention: Triton flash-attention kernels, a chunked PyTorch path and a reference."""

from .interface import FlashAttnFunc, flash_attn_backward, flash_attn_forward, flash_attn_func
from .reference import attention_reference
from .varlen import flash_attn_varlen_backward, flash_attn_varlen_forward, flash_attn_varlen_func

__all__ = ["FlashAttnFunc", "attention_reference", "flash_attn_backward", "flash_attn_forward", "flash_attn_func",
           "flash_attn_varlen_backward", "flash_attn_varlen_forward", "flash_attn_varlen_func"]
