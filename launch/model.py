"""A small decoder-only transformer whose attention layers run ``dist_attn.ring_attention``.

Every rank of a sequence-parallel (SP) group holds its shard of the same sequences (``dist_attn.shard``
with the group's layout) and runs the whole model on it: embeddings, projections, MLPs and the LM head
act token by token, so only attention needs the other ranks, and the ring gives it exactly. RoPE
rotates queries and keys by their *global* positions (``dist_attn.global_positions``), so the model
computes the same function for every SP size and layout. Pre-norm blocks, grouped-query attention
(``kv_heads`` key/value heads shared by ``heads // kv_heads`` query heads each), GELU MLP.

    model = Transformer(vocab=64, dim=64, layers=2, heads=4, kv_heads=2)
    logits = model(ids_local, positions_local, layout="zigzag", group=sp_group)   # (B, T_local, vocab)
"""

from __future__ import annotations

import torch
import torch.nn as nn
from einops import rearrange

from dist_attn import ring_attention
from dist_attn.tensor_parallel import ColumnParallelLinear, RowParallelLinear

ROPE_THETA = 10_000.0


def rope_angles(positions, headdim):
    """cos and sin, each (T, 1, hs/2), of the rotation at every global position (float32)."""
    inv_freq = ROPE_THETA ** -(torch.arange(0, headdim, 2, device=positions.device, dtype=torch.float32) / headdim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, hs/2)
    return angles.cos()[:, None, :], angles.sin()[:, None, :]


def apply_rope(x, cos, sin):
    """Rotates the two halves of every head of x (B, T, nh, hs) as the real and imaginary parts, in float32
    (cos and sin are float32), returned in x's dtype (bf16 q and k stay bf16, as v is)."""
    x1, x2 = x.chunk(2, dim=-1)  # (B, T, nh, hs/2) each
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


def ring_self_attention(q, k, v, layout, group):
    """The default attention: causal ring attention over the SP group."""
    return ring_attention(q, k, v, causal=True, layout=layout, group=group)


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads, attention=None):
        super().__init__()
        self.headdim = dim // heads
        self.attention = attention or ring_self_attention  # (q, k, v, layout, group) -> (B, T, nh, hs)
        self.wq = nn.Linear(dim, heads * self.headdim, bias=False)
        self.wkv = nn.Linear(dim, 2 * kv_heads * self.headdim, bias=False)
        self.wo = nn.Linear(heads * self.headdim, dim, bias=False)

    def forward(self, x, rope, layout, group):
        q = rearrange(self.wq(x), "b t (h d) -> b t h d", d=self.headdim)  # (B, T, nh, hs)
        k, v = rearrange(self.wkv(x), "b t (two h d) -> two b t h d", two=2, d=self.headdim)  # (B, T, nkv, hs)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = self.attention(q, k, v, layout, group)  # (B, T, nh, hs), over the whole sequence of the SP group
        return self.wo(rearrange(y, "b t h d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, attention=None):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.attn = Attention(dim, heads, kv_heads, attention)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x, rope, layout, group):
        x = x + self.attn(self.norm1(x), rope, layout, group)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """``attention(q, k, v, layout, group)`` replaces every layer's ring attention when given (the
    DeepSpeed example passes Ulysses x ring attention); it must not hold parameters."""

    def __init__(self, vocab, dim, layers, heads, kv_heads, attention=None):
        super().__init__()
        self.headdim = dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, attention) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, bias=False)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids, positions, layout="zigzag", group=None, return_hidden=False):
        """ids (B, T) and positions (T,): this rank's tokens and their global positions; every rank of
        ``group`` calls it together. Returns logits (B, T, vocab) for this rank's tokens, or with
        ``return_hidden`` the final hidden states (B, T, C) the head would take (for a fused head + loss)."""
        rope = rope_angles(positions, self.headdim)
        x = self.embed(ids)  # (B, T, C)
        for block in self.blocks:
            x = block(x, rope, layout, group)
        x = self.norm(x)
        return x if return_hidden else self.head(x)  # (B, T, C) or (B, T, vocab)


# ------------------------------------------------------------------------------- pipeline and tensor parallel

class EmbedStage(nn.Module):
    """The first pipeline layer: (ids (B, T), positions (T,)) -> (hidden (B, T, C), positions)."""

    def __init__(self, embed):
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        ids, positions = inputs
        return self.embed(ids), positions


class BlockStage(nn.Module):
    """One transformer block as a pipeline layer: (hidden, positions) -> (hidden, positions); RoPE from the
    global positions every stage receives with the activations."""

    def __init__(self, block, headdim, layout, group):
        super().__init__()
        self.block, self.headdim, self.layout, self.group = block, headdim, layout, group

    def forward(self, inputs):
        x, positions = inputs
        return self.block(x, rope_angles(positions, self.headdim), self.layout, self.group), positions


class HeadStage(nn.Module):
    """The last pipeline layer: (hidden, positions) -> logits (B, T, vocab), or with ``fused`` (final hidden
    states (B, T, C), the head's weight) for a loss function that fuses the head (``linear_cross_entropy``)."""

    def __init__(self, norm, head, fused=False):
        super().__init__()
        self.norm, self.head, self.fused = norm, head, fused

    def forward(self, inputs):
        x, _ = inputs
        return (self.norm(x), self.head.weight) if self.fused else self.head(self.norm(x))


def pipeline_layers(model: Transformer, layout="zigzag", group=None, fused_head=False) -> list[nn.Module]:
    """``model`` as a list of pipeline layers (embedding, every block, norm + head) computing the same
    function as ``model(ids, positions, layout, group)``, sharing its parameters (``fused_head``: see HeadStage)."""
    return ([EmbedStage(model.embed)] + [BlockStage(block, model.headdim, layout, group) for block in model.blocks]
            + [HeadStage(model.norm, model.head, fused_head)])


def tensor_parallel_(model: Transformer, group) -> Transformer:
    """Splits every block of ``model`` (in place) over the tensor ranks of ``group``, Megatron-style: q, k/v
    and the MLP's first projection column-parallel (whole heads per rank), the attention output and the
    MLP's second projection row-parallel. Each rank's attention then runs over its own heads. Returns model."""
    for block in model.blocks:
        attn = block.attn
        attn.wq = ColumnParallelLinear.from_linear(attn.wq, group)
        attn.wkv = ColumnParallelLinear.from_linear(attn.wkv, group, parts=2)  # k and v: "(two h d)"
        attn.wo = RowParallelLinear.from_linear(attn.wo, group)
        block.mlp[0] = ColumnParallelLinear.from_linear(block.mlp[0], group)
        block.mlp[2] = RowParallelLinear.from_linear(block.mlp[2], group)
    return model
