"""Ulysses all-to-all and hybrid Ulysses x ring attention over real gloo worlds, vs float64 attention."""

from __future__ import annotations

import functools

import pytest
import torch

from attention_checks import max_error, reference_with_grads
from launch.spawn import run_world

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}  # with u=4, gqa and mqa replicate K/V heads


FEATURES = dict(headdim_v=4, softcap=2.0, sinks=True)


def make_groups(world_size, ulysses):
    """(ulysses_group, ring_group) of this rank, Ulysses on adjacent ranks."""
    from dist_attn.groups import sequence_parallel_groups

    groups = sequence_parallel_groups(ulysses, world_size // ulysses)
    return groups.ulysses_group, groups.ring_group


def cases_for(world_size):
    degrees = [(2, 1)] if world_size == 2 else [(1, 4), (2, 2), (4, 1)]
    cases = []
    for ulysses, ring in degrees:
        for causal in (False, True):
            for heads in HEADS:
                cases.append(dict(ulysses=ulysses, ring=ring, causal=causal, heads=heads, layout="zigzag"))
        cases.append(dict(ulysses=ulysses, ring=ring, causal=True, heads="gqa", layout="striped"))
        if world_size == 4:  # MLA-like head dims (v narrower), softcap and sinks
            cases.append(dict(ulysses=ulysses, ring=ring, causal=True, heads="gqa", layout="zigzag", **FEATURES))
    return cases


def case_id(case):
    return "-".join(str(v) for v in case.values())


def run_cases(rank, world_size, cases):
    from dist_attn import usp_attention, usp_gather, usp_shard
    from dist_attn.comm import traffic_meter

    groups = {u: make_groups(world_size, u) for u in sorted({c["ulysses"] for c in cases})}
    results = {}
    for case in cases:
        ulysses_group, ring_group = groups[case["ulysses"]]
        u, r = case["ulysses"], case["ring"]
        ulysses_rank, ring_rank = rank % u, rank // u
        nheads, nheads_kv = HEADS[case["heads"]]
        seqlen = 2 * r * u * 5  # odd pieces: 5 tokens per Ulysses rank per zigzag chunk
        gen = torch.Generator().manual_seed(seqlen + nheads_kv)
        headdim_v, softcap = case.get("headdim_v", 8), case.get("softcap")
        q = torch.randn(2, seqlen, nheads, 8, generator=gen)
        k = torch.randn(2, seqlen, nheads_kv, 8, generator=gen)
        v = torch.randn(2, seqlen, nheads_kv, headdim_v, generator=gen)
        dout = torch.randn(q.shape[:3] + (headdim_v,), generator=gen)
        sinks = torch.randn(nheads, generator=gen).requires_grad_() if case.get("sinks") else None
        layout, causal = case["layout"], case["causal"]

        def local(x):
            return usp_shard(x, layout, ulysses_rank, u, ring_rank, r)

        inputs = [local(x).requires_grad_() for x in (q, k, v)]
        with traffic_meter() as sent:
            out = usp_attention(*inputs, causal=causal, layout=layout, ulysses_group=ulysses_group,
                                ring_group=ring_group, softcap=softcap, sinks=sinks)
        out.backward(local(dout))
        gathered = [usp_gather(t.detach(), layout, ulysses_group, ring_group) for t in (out, *(x.grad for x in inputs))]
        names = ("out", "dq", "dk", "dv")
        if sinks is not None:  # every rank's share of d sinks: the full gradient is their sum
            torch.distributed.all_reduce(sinks.grad)
            gathered.append(sinks.grad)
            names += ("dsinks",)
        if rank == 0:
            ref_out, _, *ref_grads = reference_with_grads(q, k, v, dout, causal, softcap=softcap, sinks=sinks)
            errors = {name: max_error(got, ref) for name, got, ref in zip(names, gathered, (ref_out, *ref_grads))}
            results[case_id(case)] = dict(errors=errors, forward_bytes=sum(sent))
    return results


PACKED = [(u, r, layout) for u, r in ((2, 2), (4, 1), (1, 4)) for layout in ("zigzag", "striped", "contiguous")]
PACKED_FEATURES = [(2, 2, "zigzag", "features")]  # FEATURES (MLA dims, softcap, sinks) on packed sequences


def packed_lengths(u, r, layout):
    """Three sequence lengths (odd ones, so the layout pads them) whose padded ring shard splits over u."""
    multiple = r * (2 if layout == "zigzag" else 1)
    padded = lambda n: -(-n // multiple) * multiple  # noqa: E731
    last = next(n for n in range(1, 4 * multiple * u) if (padded(7) + padded(13) + padded(n)) // r % u == 0)
    return [7, 13, last]


def run_packed_cases(rank, world_size):
    """usp_attention on packed sequences (cu_seqlens) against float64 attention per sequence: max errors of the
    gathered output and gradients (rank 0), and the error each rank gets for a shard that does not split."""
    from dist_attn import usp_attention, usp_gather, usp_shard

    results = {}
    for u, r, layout, *features in PACKED + PACKED_FEATURES:
        ulysses_group, ring_group = make_groups(world_size, u)
        lengths = packed_lengths(u, r, layout)
        cu_seqlens = torch.tensor([0] + [sum(lengths[:i + 1]) for i in range(3)], dtype=torch.int32)
        gen = torch.Generator().manual_seed(sum(lengths) + u)
        headdim_v = FEATURES["headdim_v"] if features else 8
        q, k, v, dout = (torch.randn(sum(lengths), h, d, generator=gen) for h, d in ((4, 8), (2, 8), (2, headdim_v),
                                                                                     (4, headdim_v)))
        sinks = torch.randn(4, generator=gen).requires_grad_() if features else None
        softcap = FEATURES["softcap"] if features else None

        def local(x):
            return usp_shard(x, layout, rank % u, u, rank // u, r, cu_seqlens=cu_seqlens)

        inputs = [local(x).requires_grad_() for x in (q, k, v)]
        out = usp_attention(*inputs, causal=True, layout=layout, ulysses_group=ulysses_group, ring_group=ring_group,
                            cu_seqlens=cu_seqlens, softcap=softcap, sinks=sinks)
        out.backward(local(dout))
        gathered = [usp_gather(t.detach(), layout, ulysses_group, ring_group, cu_seqlens=cu_seqlens)
                    for t in (out, *(x.grad for x in inputs))]
        bounds = cu_seqlens.tolist()
        refs = [reference_with_grads(*(x[None, a:b] for x in (q, k, v, dout)), True, softcap=softcap, sinks=sinks)
                for a, b in zip(bounds, bounds[1:])]
        expected = [torch.cat([ref[i][0] for ref in refs]) for i in (0, 2, 3, 4)]
        if sinks is not None:  # summed over the sequences (reference) and over the ranks (ours)
            torch.distributed.all_reduce(sinks.grad)
            gathered.append(sinks.grad)
            expected.append(sum(ref[5] for ref in refs))
        results[(u, r, layout, *features)] = max(max_error(g, e) for g, e in zip(gathered, expected))
    try:
        usp_shard(torch.zeros(9, 2, 8), "striped", 0, 2, 0, 1, cu_seqlens=torch.tensor([0, 5, 9], dtype=torch.int32))
        results["odd"] = None
    except ValueError as error:
        results["odd"] = str(error)
    return results


MASKED = [(2, 2, "balanced"), (2, 2, "striped"), (4, 1, "zigzag"), (1, 4, "balanced")]


def run_masked_cases(rank, world_size):
    """usp_attention with a prefix-LM mask (two documents) against float64 attention under its boolean matrix,
    written out independently (``mask_checks``): max error of the gathered output and gradients (rank 0)."""
    from dist_attn import masks, usp_attention, usp_gather, usp_shard
    from mask_checks import dense_attention_with_grads, expected_prefix_lm

    mask, visible = masks.prefix_lm([20, 9], [0, 70, 128]), expected_prefix_lm([20, 9], [0, 70, 128])
    results = {}
    for u, r, layout in MASKED:
        ulysses_group, ring_group = make_groups(world_size, u)
        gen = torch.Generator().manual_seed(u)
        q, k, v, dout = (torch.randn(2, 128, h, 8, generator=gen) for h in (4, 2, 2, 4))

        def local(x):
            return usp_shard(x, layout, rank % u, u, rank // u, r, mask=mask)

        inputs = [local(x).requires_grad_() for x in (q, k, v)]
        out = usp_attention(*inputs, layout=layout, ulysses_group=ulysses_group, ring_group=ring_group, mask=mask)
        out.backward(local(dout))
        gathered = [usp_gather(t.detach(), layout, ulysses_group, ring_group, mask=mask)
                    for t in (out, *(x.grad for x in inputs))]
        ref_out, _, *ref_grads = dense_attention_with_grads(q, k, v, dout, visible)
        results[(u, r, layout)] = max(max_error(g, e) for g, e in zip(gathered, (ref_out, *ref_grads)))
    try:
        usp_attention(*inputs, layout=layout, ulysses_group=make_groups(world_size, 2)[0], mask=mask)
        results["no_ring_group"] = None
    except ValueError as error:
        results["no_ring_group"] = str(error)
    return results


def run_all(rank, world_size, cases):
    return {"dense": run_cases(rank, world_size, cases),
            "packed": run_packed_cases(rank, world_size) if world_size == 4 else None,
            "masked": run_masked_cases(rank, world_size) if world_size == 4 else None}


@functools.lru_cache(maxsize=None)
def world_outcome(world_size):
    return run_world(world_size, run_all, cases_for(world_size), timeout=600)


def world_results(world_size):
    return world_outcome(world_size)[0]["dense"]


@pytest.mark.parametrize("case", PACKED + PACKED_FEATURES, ids=lambda c: "-".join(map(str, c)))
def test_packed_sequences_under_ulysses_and_ring(case):
    for rank, result in enumerate(world_outcome(4)):
        assert result["packed"][case] <= GRAD_TOL, (rank, result["packed"][case])


@pytest.mark.parametrize("case", MASKED, ids=lambda c: "-".join(map(str, c)))
def test_masks_under_ulysses_and_ring(case):
    assert world_outcome(4)[0]["masked"][case] <= GRAD_TOL, world_outcome(4)[0]["masked"][case]


def test_a_mask_without_a_ring_group_is_refused_in_a_world():
    """ring_group=None would run the ring over the default group: refused on every rank, before any collective."""
    for result in world_outcome(4):
        assert "ring_group must be given with mask" in result["masked"]["no_ring_group"], result["masked"]


def test_a_packed_ring_shard_that_does_not_split_is_an_error():
    message = world_outcome(4)[0]["packed"]["odd"]
    assert message is not None and "holds 9 tokens" in message and "Ulysses degree 2" in message, message


ALL = [(w, c) for w in (2, 4) for c in cases_for(w)]


@pytest.mark.parametrize("world_size,case", ALL, ids=[f"w{w}-{case_id(c)}" for w, c in ALL])
def test_usp_matches_full_attention(world_size, case):
    errors = world_results(world_size)[case_id(case)]["errors"]
    assert errors["out"] <= FWD_TOL, errors
    assert max(errors[name] for name in ("dq", "dk", "dv", "dsinks") if name in errors) <= GRAD_TOL, errors


def test_forward_traffic_matches_the_formula():
    """Bytes one rank sends in a forward: Ulysses moves (u-1)/u of q, k, v and out; the ring (r-1) K/V blocks
    (K and V side by side: head dims 8 + headdim_v)."""
    for case in cases_for(4):
        u, r = case["ulysses"], case["ring"]
        nheads, nheads_kv = HEADS[case["heads"]]
        local_len, headdim, headdim_v, batch, elem = 2 * r * u * 5 // (u * r), 8, case.get("headdim_v", 8), 2, 4
        kv_heads = max(nheads_kv, u) if u > 1 else nheads_kv  # replicated up to one per Ulysses rank
        unit = batch * local_len * elem  # one head dim of one head of this rank's tokens
        ulysses = (u - 1) * unit * (nheads + kv_heads) * (headdim + headdim_v) // u if u > 1 else 0
        ring = (r - 1) * batch * local_len * u * (kv_heads // u) * (headdim + headdim_v) * elem
        measured = world_results(4)[case_id(case)]["forward_bytes"]
        assert measured == ulysses + ring, (case, measured, ulysses, ring)


def bad_heads(rank, world_size, nheads, nheads_kv):
    from dist_attn import usp_attention

    ulysses_group, ring_group = make_groups(world_size, world_size)
    q, kv = torch.randn(1, 4, nheads, 8), torch.randn(1, 4, nheads_kv, 8)
    try:
        usp_attention(q, kv, kv, ulysses_group=ulysses_group, ring_group=ring_group)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("nheads,nheads_kv,message", [
    (3, 3, r"nheads \(3\) must be divisible by the Ulysses degree \(2\)"),
    (6, 3, r"nheads_kv \(3\) must divide or be a multiple of the Ulysses degree \(2\)"),
])
def test_heads_that_do_not_split_are_an_error_on_every_rank(nheads, nheads_kv, message):
    import re

    messages = run_world(2, bad_heads, nheads, nheads_kv, timeout=120)
    assert all(re.search(message, m) for m in messages), messages
