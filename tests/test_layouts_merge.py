"""Layouts (which positions a rank holds) and the online-softmax merge, without processes."""

from __future__ import annotations

import pytest
import torch

from dist_attn import LAYOUTS, global_positions, shard
from dist_attn.layouts import segments
from dist_attn.kernels.merge import merge_
from dist_attn.kernels import attention_reference


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_shard_holds_the_positions_the_layout_promises(layout, world_size):
    seqlen = 2 * world_size * 5
    tokens = torch.arange(seqlen).view(1, seqlen, 1)
    held = []
    for rank in range(world_size):
        local = shard(tokens, layout=layout, rank=rank, world_size=world_size)
        positions = global_positions(layout, rank, world_size, local.shape[1])
        assert torch.equal(local.flatten(), positions)
        for seg in segments(layout, rank, world_size, local.shape[1]):  # what the kernel is told
            assert torch.equal(local[0, seg.rows, 0], seg.offset + seg.stride * torch.arange(seg.length))
        held.append(positions)
    assert torch.equal(torch.cat(held).sort().values, torch.arange(seqlen)), "every token on exactly one rank"


def test_zigzag_balances_causal_work():
    world_size, local_len = 4, 8
    work = [sum(int(p) + 1 for p in global_positions("zigzag", r, world_size, local_len)) for r in range(world_size)]
    assert len(set(work)) == 1, work


@pytest.mark.parametrize("layout,multiple", [("contiguous", 3), ("zigzag", 6), ("striped", 3)])
def test_shard_needs_a_divisible_length(layout, multiple):
    with pytest.raises(ValueError, match=f"must be a multiple of {multiple} for layout='{layout}'"):
        shard(torch.zeros(1, multiple + 1, 2), layout=layout, rank=0, world_size=3)


@pytest.mark.parametrize("kwargs,message", [
    (dict(layout="zig"), "layout must be one of"),
    (dict(rank=3, world_size=3), r"rank must be an int in \[0, 3\)"),
    (dict(world_size=0), "world_size must be an int >= 1"),
])
def test_shard_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        shard(torch.zeros(1, 12, 2), **kwargs)


def test_merge_of_two_key_blocks_equals_attention_over_both():
    q, k, v = torch.randn(2, 9, 3, 8), torch.randn(2, 20, 3, 8), torch.randn(2, 20, 3, 8)
    full_out, full_lse = attention_reference(q, k, v)
    out, lse = attention_reference(q, k[:, :7], v[:, :7])
    block_out, block_lse = attention_reference(q, k[:, 7:], v[:, 7:])
    merge_(out, lse, block_out, block_lse)
    torch.testing.assert_close(out, full_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, full_lse, rtol=0, atol=1e-6)


def test_merge_with_fully_masked_sides():
    out, lse = torch.zeros(1, 2, 1, 4), torch.full((1, 1, 2), float("-inf"))
    block_out, block_lse = torch.ones(1, 2, 1, 4), torch.tensor([[[0.5, float("-inf")]]])
    block_out[:, 1] = 0.0  # a masked row of the block is 0 with lse -inf, as the kernels return it
    merge_(out, lse, block_out, block_lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(out[0, 0], torch.ones(1, 4)) and lse[0, 0, 0] == 0.5  # -inf side weighs nothing
    assert torch.equal(out[0, 1], torch.zeros(1, 4)) and lse[0, 0, 1] == float("-inf")  # both masked
