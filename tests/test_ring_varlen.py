"""ring_attention over packed variable-length sequences (``cu_seqlens``) against float64 attention
computed sequence by sequence, in real gloo worlds of 1-4 ranks; the packed layouts themselves."""

from __future__ import annotations

import functools

import pytest
import torch

from attention_checks import max_error, reference_with_grads
from dist_attn.layouts import LAYOUTS, packed_local_length, packed_segments, padded_seqlens
from dist_attn.ring import visible_pairs
from dist_attn.kernels.positions import Positions
from launch.spawn import WorldFailed, run_world

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
WORLD_SIZES = [1, 2, 3, 4]
SEQLENS = (1, 7, 130, 515)  # divisible by nothing convenient; 1 token is shorter than any world


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def cases(world_size):
    """Every case at every world, but w = 3 runs GQA only (MHA is the same code with group 1)."""
    heads_options = ((4, 2),) if world_size == 3 else ((4, 4), (4, 2))
    result = [dict(layout=layout, causal=causal, heads=heads, window=None, backend="torch", lengths=SEQLENS)
              for layout in LAYOUTS for causal in (False, True) for heads in heads_options]
    result.append(dict(layout="zigzag", causal=True, heads=(4, 2), window=(20, 0), backend="torch", lengths=SEQLENS))
    result.append(dict(layout="striped", causal=False, heads=(2, 1), window=(3, 5), backend="torch",
                       lengths=(0, 33, 2)))
    # the Triton kernels (interpreter on CPU) inside the ring, small
    result.append(dict(layout="zigzag", causal=True, heads=(2, 1), window=None, backend="triton", lengths=(5, 40, 19)))
    # MLA-like head dims (v 8, q/k 16), softcap and sinks: padded rows must stay 0 with a sink too
    result += [dict(layout=layout, causal=True, heads=(4, 2), window=None, backend="torch", lengths=(5, 40, 19, 0),
                    features=True) for layout in LAYOUTS]
    return result


def case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case.values())


def run_case(rank, world_size, case):
    from dist_attn import gather, ring_attention, shard

    lengths, (nheads, nheads_kv) = case["lengths"], case["heads"]
    cu_seqlens, total = cu(lengths), sum(lengths)
    gen = torch.Generator().manual_seed(total)
    features = case.get("features", False)
    headdim_v, softcap = (8, 2.0) if features else (16, None)
    q = torch.randn(total, nheads, 16, generator=gen)
    k = torch.randn(total, nheads_kv, 16, generator=gen)
    v = torch.randn(total, nheads_kv, headdim_v, generator=gen)
    dout = torch.randn(total, nheads, headdim_v, generator=gen)
    sinks = torch.randn(nheads, generator=gen).requires_grad_() if features else None
    layout, causal, window = case["layout"], case["causal"], case["window"]
    local = [shard(x, layout, rank, world_size, cu_seqlens=cu_seqlens).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, causal=causal, layout=layout, window=window, cu_seqlens=cu_seqlens,
                         backend=case["backend"], softcap=softcap, sinks=sinks)
    out.backward(shard(dout, layout, rank, world_size, cu_seqlens=cu_seqlens))
    padding = shard(torch.ones(total), layout, rank, world_size, cu_seqlens=cu_seqlens) == 0
    padding_zero = all(torch.all(t[padding] == 0).item() for t in (out, *(x.grad for x in local)))
    results = [gather(t.detach(), layout, cu_seqlens=cu_seqlens) for t in (out, *(x.grad for x in local))]
    if sinks is not None and world_size > 1:  # the ranks' shares of d sinks sum to the gradient
        torch.distributed.all_reduce(sinks.grad)
    if rank != 0:
        return padding_zero
    errors = dict.fromkeys(("out", "dq", "dk", "dv"), 0.0)
    dsinks = 0
    for start, end in zip(cu_seqlens.tolist(), cu_seqlens[1:].tolist()):
        if end == start:
            continue
        reference = reference_with_grads(q[None, start:end], k[None, start:end], v[None, start:end],
                                         dout[None, start:end], causal, window, softcap=softcap, sinks=sinks)
        for name, got, ref in zip(errors, results, (reference[0], *reference[2:5])):
            errors[name] = max(errors[name], max_error(got[start:end], ref[0]))
        dsinks = dsinks + (reference[5] if sinks is not None else 0)
    if sinks is not None:
        errors["dsinks"] = max_error(sinks.grad, dsinks)
    errors["nan"] = any(torch.isnan(t).any().item() for t in results)
    errors["padding_zero"] = padding_zero
    return errors


def run_all(rank, world_size):
    return {case_id(case): run_case(rank, world_size, case) for case in cases(world_size)}


@functools.lru_cache(maxsize=None)
def world_results(world_size):
    return run_world(world_size, run_all, timeout=600)[0]


ALL = [(w, case) for w in WORLD_SIZES for case in cases(w)]


@pytest.mark.parametrize("world_size,case", ALL, ids=[f"w{w}-{case_id(c)}" for w, c in ALL])
def test_packed_ring_matches_attention_per_sequence(world_size, case):
    errors = world_results(world_size)[case_id(case)]
    assert not errors["nan"], errors
    assert errors["padding_zero"], "padded rows must give output 0 and zero gradients"
    assert errors["out"] <= FWD_TOL, errors
    assert max(errors[name] for name in ("dq", "dk", "dv", "dsinks") if name in errors) <= GRAD_TOL, errors


# ------------------------------------------------------------------------------------ layouts

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_packed_shard_and_padding_rule(layout, world_size):
    """Every token lands on exactly one rank, padding is at most 2w-1 per sequence, local lengths agree."""
    from dist_attn import gather, global_positions, shard

    lengths = (1, 0, 7, 130, 515)
    cu_seqlens = cu(lengths)
    x = torch.arange(1, sum(lengths) + 1, dtype=torch.float64)
    parts = [shard(x, layout, r, world_size, cu_seqlens=cu_seqlens) for r in range(world_size)]
    local_len = packed_local_length(cu_seqlens.tolist(), layout, world_size)
    assert all(p.shape == (local_len,) for p in parts)
    values = torch.cat(parts)
    assert torch.equal(values[values > 0].sort().values, x), "every token exactly once"
    multiple = world_size * (2 if layout == "zigzag" else 1)
    for length, padded in zip(lengths, padded_seqlens(cu_seqlens.tolist(), layout, world_size)):
        assert padded % multiple == 0 and 0 <= padded - length < multiple
    if world_size == 1:
        assert torch.equal(gather(parts[0], layout, cu_seqlens=cu_seqlens), x)
    for r, part in enumerate(parts):  # the positions say where each token sits in its sequence
        positions = global_positions(layout, r, world_size, cu_seqlens=cu_seqlens)
        real = part > 0
        starts = torch.tensor(cu_seqlens[:-1].tolist())
        sequence = torch.searchsorted(starts, (part[real] - 1).long(), right=True) - 1
        assert torch.equal(positions[real], (part[real] - 1).long() - starts[sequence])


def causal_work(layout, world_size, bounds):
    """Visible (query, key) pairs each rank computes over the ring, for packed causal attention."""
    work = []
    for rank in range(world_size):
        total = 0
        for source in range(world_size):
            for q_seg, k_seg in visible_pairs(layout, rank, source, world_size, None, True, None, bounds):
                for (_, q_len, q_off), (_, k_len, k_off) in zip(q_seg.spans, k_seg.spans):
                    qp = Positions(q_off, q_seg.stride, q_len).at(torch.arange(q_len))
                    kp = Positions(k_off, k_seg.stride, k_len).at(torch.arange(k_len))
                    total += int((kp[None, :] <= qp[:, None]).sum())
        work.append(total)
    return work


@pytest.mark.parametrize("world_size", [2, 4])
def test_zigzag_balances_causal_work_of_packed_batches(world_size):
    """Per-rank causal work max/mean <= 1.05 for zigzag and striped; contiguous is far off (the control)."""
    bounds = tuple(cu((1000, 77, 1501, 3001, 5)).tolist())
    balance = {}
    for layout in LAYOUTS:
        work = causal_work(layout, world_size, bounds)
        assert sum(work) == sum(n * (n + 1) // 2 for n in (1000, 77, 1501, 3001, 5))  # every pair exactly once
        balance[layout] = max(work) / (sum(work) / world_size)
    assert balance["zigzag"] <= 1.05 and balance["striped"] <= 1.05, balance
    assert balance["contiguous"] > 1.3, balance


def test_packed_segments_spans():
    """Hand-worked: lengths 5 and 3 on 2 ranks, zigzag -> padded to 8 and 4, chunks of 2 and 1."""
    bounds = (0, 5, 8)
    first, second = packed_segments("zigzag", 0, 2, bounds)
    assert (first.start, first.length, first.spans, first.slots) == (0, 3, ((0, 2, 0), (2, 1, 0)), (2, 1))
    # chunk 3 of 4: sequence 0 positions 6, 7 (padding: 5 is the last real one), sequence 1 position 3 (padding)
    assert (second.start, second.length, second.spans, second.slots) == (3, 3, ((0, 0, 6), (2, 0, 3)), (2, 1))
    striped = packed_segments("striped", 1, 2, bounds)[0]
    assert striped.stride == 2 and striped.spans == ((0, 2, 1), (3, 1, 1))


# ------------------------------------------------------------------------------------ bad input

def mismatched_cu_seqlens(rank, world_size):
    from dist_attn import ring_attention

    lengths = (5, 11) if rank == 0 else (11, 5)  # same local size, different sequences
    x = torch.randn(packed_local_length(cu(lengths).tolist(), "zigzag", world_size), 2, 8)
    ring_attention(x, x, x, causal=True, cu_seqlens=cu(lengths))


def test_ranks_with_different_cu_seqlens_all_raise():
    with pytest.raises(WorldFailed, match=r"cu_seqlens checksum"):
        run_world(2, mismatched_cu_seqlens, timeout=120)


def test_packed_bad_input_errors():
    from dist_attn import ring_attention, shard

    x = torch.randn(12, 2, 8)
    with pytest.raises(ValueError, match=r"q holds 12 packed tokens; cu_seqlens .* give each rank 14"):
        ring_attention(x, x, x, layout="zigzag", cu_seqlens=cu((5, 7)))  # 5 -> 6 and 7 -> 8 for w=1 zigzag
    with pytest.raises(ValueError, match=r"q must be 3-D \(total_tokens, nheads, headdim\)"):
        ring_attention(x[None], x[None], x[None], cu_seqlens=cu((12,)))
    with pytest.raises(TypeError, match=r"cu_seqlens.dtype must be torch.int32"):
        ring_attention(x, x, x, cu_seqlens=cu((12,)).long())
    with pytest.raises(ValueError, match=r"cu_seqlens\[-1\] \(11\) must equal the packed length of x along dim 0 \(12\)"):
        shard(x, "zigzag", 0, 2, cu_seqlens=cu((11,)))
    with pytest.raises(ValueError, match=r"non-decreasing"):
        shard(x, "zigzag", 0, 2, cu_seqlens=torch.tensor([0, 13, 12], dtype=torch.int32))
