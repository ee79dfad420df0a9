"""Single-device attention: Triton flash-attention kernels, a chunked PyTorch path and a reference.

Imported as ``dist_attn.kernels`` (``dist_attn/kernels`` links to this folder; setuptools installs it there):
the top-level name ``kernels`` belongs to Hugging Face's kernels package.
"""

from .interface import FlashAttnFunc, flash_attn_backward, flash_attn_forward, flash_attn_func
from .reference import attention_reference
from .varlen import flash_attn_varlen_backward, flash_attn_varlen_forward, flash_attn_varlen_func

__all__ = ["FlashAttnFunc", "attention_reference", "flash_attn_backward", "flash_attn_forward", "flash_attn_func",
           "flash_attn_varlen_backward", "flash_attn_varlen_forward", "flash_attn_varlen_func"]
