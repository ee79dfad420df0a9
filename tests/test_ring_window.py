"""Sliding windows across the ring: exact against float64 for windows smaller than, equal to and larger
than the per-rank block, and blocks that no rank needs are not sent (``ring_plan``)."""

from __future__ import annotations

import functools

import pytest
import torch

from attention_checks import max_error, reference_with_grads
from dist_attn.layouts import LAYOUTS
from dist_attn.ring import ring_plan, visible_pairs
from launch.spawn import run_world

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
LOCAL_LEN = 16  # tokens per rank (two chunks of 8 for zigzag)
WINDOWS = [(5, 0), (16, 0), (40, 0), (5, 5), (16, 16), (40, 3), (0, 5), (0, None)]  # smaller, equal, larger than a block


def cases(world_size):
    return [dict(layout=layout, causal=causal, window=window)
            for layout in LAYOUTS for causal in (True, False) for window in WINDOWS
            if not (causal and window[1])]  # causal already drops the right side


def case_id(case):
    return f"{case['layout']}-{'causal' if case['causal'] else 'full'}-{case['window']}".replace(" ", "")


def run_case(rank, world_size, case):
    from dist_attn import gather, ring_attention, shard
    from dist_attn.comm import traffic_meter

    layout, causal, window = case["layout"], case["causal"], case["window"]
    seqlen = LOCAL_LEN * world_size
    gen = torch.Generator().manual_seed(seqlen)
    q = torch.randn(1, seqlen, 4, 8, generator=gen)
    k, v = (torch.randn(1, seqlen, 2, 8, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    local = [shard(x, layout, rank, world_size).requires_grad_() for x in (q, k, v)]
    with traffic_meter() as sent_forward:
        out = ring_attention(*local, causal=causal, layout=layout, window=window, check_peers=False)
    with traffic_meter() as sent_backward:
        out.backward(shard(dout, layout, rank, world_size))
    results = [gather(t.detach(), layout) for t in (out, *(x.grad for x in local))]
    sent = {"forward": list(sent_forward), "backward": list(sent_backward)}
    if rank != 0:
        return sent
    reference = reference_with_grads(q, k, v, dout, causal, window)
    errors = {name: max_error(got, ref) for name, got, ref in
              zip(("out", "dq", "dk", "dv"), results, (reference[0], *reference[2:]))}
    return {**sent, "errors": errors}


def run_all(rank, world_size):
    return {case_id(case): run_case(rank, world_size, case) for case in cases(world_size)}


@functools.lru_cache(maxsize=None)
def world_results(world_size):
    return run_world(world_size, run_all, timeout=600)


ALL = [(w, case) for w in (3, 4) for case in cases(w)]


@pytest.mark.parametrize("world_size,case", ALL, ids=[f"w{w}-{case_id(c)}" for w, c in ALL])
def test_windowed_ring_is_exact_and_sends_only_needed_blocks(world_size, case):
    per_rank = [result[case_id(case)] for result in world_results(world_size)]
    errors = per_rank[0]["errors"]
    assert errors["out"] <= FWD_TOL and max(errors["dq"], errors["dk"], errors["dv"]) <= GRAD_TOL, errors

    kv_bytes = 2 * LOCAL_LEN * 2 * 8 * 4              # K and V: 16 tokens x 2 heads x 8 dims, fp32
    fwd_hops, bwd_hops = ring_plan(case["layout"], world_size, LOCAL_LEN, case["causal"], case["window"])
    chain_messages = (fwd_hops + 1 if fwd_hops else 0) + bwd_hops  # dK/dV accumulators, last hop straight home
    for sent in per_rank:
        assert sent["forward"] == [kv_bytes] * (fwd_hops + bwd_hops)
        assert sorted(sent["backward"]) == [kv_bytes] * (fwd_hops + bwd_hops + chain_messages)


def test_short_windows_send_less_than_the_full_ring():
    """The bytes-sent report of the issue: a window shorter than a block needs the neighbours only."""
    full = ring_plan("zigzag", 8, LOCAL_LEN, True, None)
    assert full == (7, 0)
    assert ring_plan("contiguous", 8, LOCAL_LEN, True, (5, 0)) == (1, 0)     # 1 of 7 blocks sent
    assert ring_plan("zigzag", 8, LOCAL_LEN, True, (5, 0)) == (1, 1)         # chunk 2w-1-r needs rank r+1
    assert ring_plan("contiguous", 8, LOCAL_LEN, False, (5, 5)) == (1, 1)
    assert ring_plan("contiguous", 8, LOCAL_LEN, True, (40, 0)) == (3, 0)    # 40 tokens reach 3 blocks back
    assert ring_plan("striped", 8, LOCAL_LEN, True, (5, 0)) == (7, 0)       # every rank holds every neighbourhood


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [2, 5, 8])
def test_plan_covers_every_needed_block_exactly_once(layout, world_size):
    """Every (rank, source) pair with visible work is reached by exactly one direction of the plan."""
    for causal in (True, False):
        for window in WINDOWS + [None]:
            if causal and window and window[1]:
                continue
            fwd, bwd = ring_plan(layout, world_size, LOCAL_LEN, causal, window)
            assert fwd + bwd <= world_size - 1
            for rank in range(world_size):
                for source in range(world_size):
                    distance = (rank - source) % world_size
                    reached = (distance <= fwd) + (distance != 0 and world_size - distance <= bwd)
                    needed = bool(visible_pairs(layout, rank, source, world_size, LOCAL_LEN, causal, window))
                    assert reached == 1 if needed else reached <= 1, (rank, source, fwd, bwd)
