"""Masks (``dist_attn.masks``) through the kernels and the ring, against float64 attention under a boolean matrix
written out from each mask's definition (``tests/mask_checks.py``, independent of the slice code): the pair
kernels on both backends, then ``ring_attention(mask=...)`` in gloo worlds of 1-4 ranks (and 8 once) for every
layout including ``balanced``, forward and gradients, with the bytes each rank sends checked against the plan."""

from __future__ import annotations

import functools

import pytest
import torch

from attention_checks import max_error
from dist_attn import masks
from dist_attn.kernels.positions import PackedPair, Positions
from launch.spawn import WorldFailed, run_world
from mask_checks import (dense_attention_with_grads, expected_block_sparse, expected_documents, expected_prefix_lm,
                         expected_shared_prompt)

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
SEQLEN = 192  # splits for zigzag at w = 1..4 (2w chunks) and into >= 16-token balanced chunks
MASK_LAYOUTS = ("contiguous", "zigzag", "striped", "balanced")


def block_pattern():
    """12 x 12 blocks of 16: the diagonal, a few random blocks, and query block 3 seeing nothing (empty rows)."""
    gen = torch.Generator().manual_seed(3)
    blocks = (torch.rand(12, 12, generator=gen) < 0.25) | torch.eye(12, dtype=torch.bool)
    blocks[3] = False
    return blocks


FAMILIES = {
    "documents": (lambda: masks.documents([0, 50, 53, 130, 192]),
                  lambda: expected_documents([0, 50, 53, 130, 192], True, None)),
    "documents_window": (lambda: masks.documents([0, 100, 192], causal=False, window=(7, 3)),
                         lambda: expected_documents([0, 100, 192], False, (7, 3))),
    "prefix_lm": (lambda: masks.prefix_lm([30, 0, 41], [0, 70, 75, 192]),
                  lambda: expected_prefix_lm([30, 0, 41], [0, 70, 75, 192])),
    "shared_prompt": (lambda: masks.shared_prompt(40, [60, 12, 80]), lambda: expected_shared_prompt(40, [60, 12, 80])),
    "block_sparse": (lambda: masks.block_sparse(block_pattern(), 16), lambda: expected_block_sparse(block_pattern(),
                                                                                                   16, SEQLEN)),
}


def inputs(seed, batch=2, heads=(4, 2), headdim_v=16, features=False):
    gen = torch.Generator().manual_seed(seed)
    nheads, nheads_kv = heads
    q = torch.randn(batch, SEQLEN, nheads, 16, generator=gen)
    k = torch.randn(batch, SEQLEN, nheads_kv, 16, generator=gen)
    v = torch.randn(batch, SEQLEN, nheads_kv, headdim_v, generator=gen)
    dout = torch.randn(batch, SEQLEN, nheads, headdim_v, generator=gen)
    sinks = torch.randn(nheads, generator=gen) if features else None
    return q, k, v, dout, sinks


# ------------------------------------------------------------------------------------ kernels


def test_segment_tables_cut_rows_that_several_pairs_reach():
    """Hand-worked: query rows 0-9 meet key block A and rows 5-19 block B -> segments [0, 5): A, [5, 10): A and B,
    [10, 20): B, each with the positions of its first row; seen from the keys, two disjoint segments."""
    from dist_attn.kernels.triton_attention import _segment_tables

    a = PackedPair(0, Positions(100, 1, 10), 0, Positions(0, 1, 8), 3, 0)
    b = PackedPair(5, Positions(105, 1, 15), 8, Positions(50, 1, 4), 200, 200)
    segments, entries, longest = _segment_tables([a, b], "q", "cpu")
    assert segments.tolist() == [[0, 5, 100, 0, 1], [5, 5, 105, 1, 2], [10, 10, 110, 3, 1]]
    assert entries.tolist() == [[0, 8, 0, 3, 0], [0, 8, 0, 3, 0], [8, 4, 50, 200, 200], [8, 4, 50, 200, 200]]
    assert longest == 10
    segments, entries, longest = _segment_tables([a, b], "k", "cpu")
    assert segments.tolist() == [[0, 8, 0, 0, 1], [8, 4, 50, 1, 1]]
    assert entries.tolist() == [[0, 10, 100, 3, 0], [5, 15, 105, 200, 200]]
    assert longest == 8


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", FAMILIES)
def test_pair_kernels_match_dense_attention(name, backend):
    """One call per kernel for every piece of the mask (GQA; batch 2 on the torch backend, 1 under Triton's
    slow interpreter); rows that see nothing give 0 and -inf."""
    from dist_attn.kernels.varlen import flash_attn_pairs_backward, flash_attn_pairs_forward
    from dist_attn.ring import mask_pairs

    build, expected = FAMILIES[name]
    mask, visible = build(), expected()
    q, k, v, dout, _ = inputs(len(name), *((2, (4, 2)) if backend == "torch" else (1, (2, 1))))
    batch, n, nheads, _ = q.shape
    pairs = mask_pairs(mask, "contiguous", 0, 0, 1, n, batch)
    packed = [x.reshape(batch * n, *x.shape[2:]) for x in (q, k, v, dout)]
    out = torch.zeros(batch * n, nheads, v.shape[-1])
    lse = torch.full((nheads, batch * n), float("-inf"))
    flash_attn_pairs_forward(*packed[:3], None, pairs, out, lse, backend=backend)
    grads = [torch.zeros(x.shape) for x in packed[:3]]
    flash_attn_pairs_backward(packed[3], *packed[:3], out, lse, None, pairs, *grads, backend=backend)
    ref_out, ref_lse, *ref_grads = dense_attention_with_grads(q, k, v, dout, visible)
    lse = lse.view(nheads, batch, n).permute(1, 0, 2)
    empty = ~visible.any(1)
    assert (name == "block_sparse") == bool(empty.any())
    assert torch.all(out.view(q.shape[:3] + (-1,))[:, empty] == 0) and torch.all(lse[:, :, empty] == float("-inf"))
    assert torch.all(grads[0].view(q.shape)[:, empty] == 0)
    assert not any(torch.isnan(t).any() for t in (out, *grads))
    finite = ~empty
    assert max_error(out.view(ref_out.shape), ref_out) <= FWD_TOL
    assert max_error(lse[:, :, finite], ref_lse[:, :, finite]) <= FWD_TOL
    for got, ref in zip(grads, ref_grads):
        assert max_error(got.view(ref.shape), ref) <= GRAD_TOL


# ------------------------------------------------------------------------------------ ring


def ring_cases(world_size):
    """Every family under every layout at w = 4, two layouts per family (in turn) at w = 2 and 3, two families at
    w = 1 (where all layouts are the same); at each world also the Triton kernels and, in a batch of 2, MLA-like
    head dims (v 8) with softcap, sinks and MQA. At w = 8 block-sparse balanced and the features zigzag."""
    names = list(FAMILIES)
    if world_size == 1:  # the pair kernels' test covers every family on one device
        cases = [dict(name=name, layout="balanced") for name in ("documents", "prefix_lm")]
    elif world_size < 4:
        cases = [dict(name=name, layout=MASK_LAYOUTS[(i + j + world_size) % 4]) for i, name in enumerate(names)
                 for j in (0, 2)]
    else:
        cases = [dict(name=name, layout=layout) for name in names for layout in MASK_LAYOUTS]
    cases = [dict(case, backend="torch") for case in cases]
    if world_size == 8:
        return [dict(name="block_sparse", layout="balanced", backend="torch"),
                dict(name="shared_prompt", layout="zigzag", backend="torch", features=True)]
    cases.append(dict(name="prefix_lm", layout="balanced", backend="triton"))
    cases.append(dict(name="shared_prompt", layout="balanced", backend="torch", features=True))
    return cases


def case_id(case):
    return "-".join(str(v) for v in case.values())


def needed_distances(visible, layout, world_size, mask):
    """Source distances d at which some rank's queries see some key of rank r - d, from the boolean matrix."""
    from dist_attn import global_positions

    local = SEQLEN // world_size
    positions = [global_positions(layout, r, world_size, local, mask=mask) for r in range(world_size)]
    return {d for d in range(1, world_size) for r in range(world_size)
            if visible[positions[r]][:, positions[(r - d) % world_size]].any()}


def run_ring_case(rank, world_size, case):
    from dist_attn import gather, ring_attention, shard
    from dist_attn.comm import traffic_meter
    from dist_attn.ring import ring_plan

    build, expected = FAMILIES[case["name"]]
    mask, features, layout = build(), case.get("features", False), case["layout"]
    shape = dict(batch=2, heads=(4, 1), headdim_v=8) if features else dict(batch=1, heads=(2, 1))
    q, k, v, dout, sinks = inputs(world_size, features=features, **shape)
    softcap = 3.0 if features else None
    sinks = sinks.requires_grad_() if features else None
    local = [shard(x, layout, rank, world_size, mask=mask).requires_grad_() for x in (q, k, v)]
    with traffic_meter() as sent_forward:
        out = ring_attention(*local, mask=mask, layout=layout, backend=case["backend"], softcap=softcap, sinks=sinks)
    with traffic_meter() as sent_backward:
        out.backward(shard(dout, layout, rank, world_size, mask=mask))
    results = [gather(t.detach(), layout, mask=mask) for t in (out, *(x.grad for x in local))]
    if sinks is not None and world_size > 1:
        torch.distributed.all_reduce(sinks.grad)
    plan = ring_plan(layout, world_size, SEQLEN // world_size, False, None, None, mask)
    sent = dict(forward=list(sent_forward), backward=list(sent_backward), plan=plan)
    if rank != 0:
        return sent
    visible = expected()
    reference = dense_attention_with_grads(q, k, v, dout, visible, softcap=softcap, sinks=sinks)
    errors = {name: max_error(got, ref) for name, got, ref in
              zip(("out", "dq", "dk", "dv"), results, (reference[0], *reference[2:5]))}
    if sinks is not None:
        errors["dsinks"] = max_error(sinks.grad, reference[5])
    empty = ~visible.any(1)
    errors["empty_rows_zero"] = bool(torch.all(results[0][:, empty] == 0) and torch.all(results[1][:, empty] == 0))
    errors["nan"] = any(torch.isnan(t).any().item() for t in results)
    errors["needed"] = needed_distances(visible, layout, world_size, mask)
    return {**sent, "errors": errors, "kv_bytes": k.shape[0] * (SEQLEN // world_size) * k.shape[2]
            * (k.shape[3] + v.shape[3]) * 4}


def run_ring_cases(rank, world_size):
    return {case_id(case): run_ring_case(rank, world_size, case) for case in ring_cases(world_size)}


@functools.lru_cache(maxsize=None)
def ring_results(world_size):
    return run_world(world_size, run_ring_cases, timeout=900)


def check_ring_case(world_size, case):
    per_rank = [result[case_id(case)] for result in ring_results(world_size)]
    errors = per_rank[0]["errors"]
    print(f"w{world_size} {case_id(case)}: plan {per_rank[0]['plan']}, " + ", ".join(
        f"{name} {errors[name]:.1e}" for name in ("out", "dq", "dk", "dv", "dsinks") if name in errors))
    assert not errors["nan"] and errors["empty_rows_zero"], errors
    assert errors["out"] <= FWD_TOL, errors
    assert max(errors[name] for name in ("dq", "dk", "dv", "dsinks") if name in errors) <= GRAD_TOL, errors
    fwd_hops, bwd_hops = per_rank[0]["plan"]
    # every distance some rank needs is reached by one direction of the plan, and nothing more is sent
    assert all(d <= fwd_hops or d >= world_size - bwd_hops for d in errors["needed"]), (errors["needed"], fwd_hops,
                                                                                         bwd_hops)
    assert fwd_hops + bwd_hops <= world_size - 1
    chain_messages = (fwd_hops + 1 if fwd_hops else 0) + bwd_hops  # dK/dV accumulators, last hop straight home
    for sent in per_rank:
        assert sent["forward"] == [per_rank[0]["kv_bytes"]] * (fwd_hops + bwd_hops)
        assert sorted(sent["backward"]) == [per_rank[0]["kv_bytes"]] * (fwd_hops + bwd_hops + chain_messages)


RING = [(w, case) for w in (1, 2, 3, 4) for case in ring_cases(w)]


@pytest.mark.parametrize("world_size,case", RING, ids=[f"w{w}-{case_id(c)}" for w, c in RING])
def test_masked_ring_matches_dense_attention(world_size, case):
    check_ring_case(world_size, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", ring_cases(8), ids=case_id)
def test_masked_ring_on_eight_ranks(case):
    check_ring_case(8, case)


def test_local_documents_send_nothing():
    """Documents that each fit inside one rank's contiguous block need no K/V from anyone: plan (0, 0)."""
    from dist_attn.ring import ring_plan

    mask = masks.documents([0, 48, 96, 144, 192])
    assert ring_plan("contiguous", 4, 48, False, None, None, mask) == (0, 0)
    # documents 48-100 and 100-192 reach one rank back; one of 40-192 reaches three
    assert ring_plan("contiguous", 4, 48, False, None, None, masks.documents([0, 48, 100, 192])) == (1, 0)
    assert ring_plan("contiguous", 4, 48, False, None, None, masks.documents([0, 40, 192])) == (3, 0)
    # zigzag chunks of 24 (rank r: r and 7 - r): each document lies on two neighbouring ranks, one hop each way
    assert ring_plan("zigzag", 4, 48, False, None, None, mask) == (1, 1)


def different_masks(rank, world_size):
    from dist_attn import ring_attention

    x = torch.randn(1, 16, 2, 8)
    ring_attention(x, x, x, mask=masks.documents([0, 16 + rank, 32]), layout="contiguous")


def test_ranks_with_different_masks_all_raise():
    with pytest.raises(WorldFailed, match=r"mask checksum"):
        run_world(2, different_masks, timeout=120)


def test_bad_mask_arguments_raise():
    from dist_attn import ring_attention, shard

    x = torch.randn(1, 32, 2, 8)
    mask = masks.causal(32)
    cases = [
        (lambda: ring_attention(x, x, x, mask="causal"), TypeError, "mask must be a dist_attn.masks.Mask"),
        (lambda: ring_attention(x, x, x, mask=mask, causal=True), ValueError, "do not also pass causal"),
        (lambda: ring_attention(x, x, x, mask=mask, window=(3, 0)), ValueError, "do not also pass window"),
        (lambda: ring_attention(x, x, x, mask=masks.causal(40)), ValueError, "mask covers 40 tokens"),
        (lambda: ring_attention(x, x, x, layout="balanced"), ValueError, "pass mask="),
        (lambda: shard(x, "balanced", 0, 2), ValueError, "pass mask="),
        (lambda: shard(x, "balanced", 0, 2, mask=masks.causal(64)), ValueError, "must equal the mask's"),
        (lambda: shard(x[0], "balanced", 0, 2, mask=mask, cu_seqlens=torch.tensor([0, 32], dtype=torch.int32)),
         ValueError, "does not take cu_seqlens"),
    ]
    for call, exc, message in cases:
        with pytest.raises(exc, match=message):
            call()


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_balanced_layout_places_every_token_once(world_size):
    """shard / global_positions / gather agree for layout="balanced", and its chunks balance the mask's work."""
    from dist_attn import global_positions, shard

    mask = masks.shared_prompt(40, [60, 12, 80])
    x = torch.arange(SEQLEN)
    parts = [shard(x, "balanced", r, world_size, dim=0, mask=mask) for r in range(world_size)]
    assert torch.equal(torch.cat(parts).sort().values, x)
    for r, part in enumerate(parts):
        assert torch.equal(part, global_positions("balanced", r, world_size, mask=mask))
    work = masks.rank_work(mask, "balanced", world_size)
    assert sum(work) == mask.pairs()
    assert masks.imbalance(work) < masks.imbalance(masks.rank_work(mask, "contiguous", world_size))
