"""ring_attention over real gloo process groups against float64 attention on the full sequence.

For each world size one world is spawned (see launch/spawn.py) and runs every case: each rank builds
the same full inputs, shards them, runs the ring forward and backward, and gathers output and
gradients; rank 0 compares them with ``attention_reference`` on the full sequence.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch

from attention_checks import max_error, reference_with_grads
from launch.spawn import WorldFailed, run_world

FWD_TOL, GRAD_TOL = 2e-5, 1e-4  # fp32 vs float64 (docs/design.md)
WORLD_SIZES = [1, 2, 3, 4, 8]
LAYOUTS = ["contiguous", "zigzag", "striped"]
HEADS = {"mha": (4, 4), "gqa": (4, 2)}
FEATURES = dict(headdim_v=8, softcap=2.0, sinks=True)  # MLA-like dims (q/k 16, v 8), Gemma 2, gpt-oss
GROWTH_SEQLEN = 128  # divisible by 2 x 8 and unlike any other case: the same inputs on every world size


def case_id(case):
    return "-".join(str(v) for v in case.values())


def cases_for(world_size):
    """Per-rank lengths are odd where the layout allows it: 13 tokens (contiguous, striped) or two
    chunks of 7 (zigzag)."""
    cases = []
    for layout in LAYOUTS:
        seqlen = world_size * (14 if layout == "zigzag" else 13)
        for causal in (False, True):
            for heads in HEADS:
                cases.append(dict(layout=layout, causal=causal, heads=heads, seqlen=seqlen, dtype="float32",
                                  window=None, backend="torch"))
            cases.append(dict(layout=layout, causal=causal, heads="gqa", seqlen=seqlen, dtype="bfloat16",
                              window=None, backend="torch"))
        cases.append(dict(layout=layout, causal=True, heads="gqa", seqlen=seqlen, dtype="float32",
                          window=(9, 0), backend="torch"))
    if world_size in (2, 3):  # the Triton kernels (interpreter on CPU) inside the ring: small shapes; every layout
        for layout in LAYOUTS if world_size == 2 else ["zigzag"]:  # at w = 2, zigzag at w = 3 (CI time: ~15 s)
            seqlen = world_size * (14 if layout == "zigzag" else 13)
            cases.append(dict(layout=layout, causal=True, heads="gqa", seqlen=seqlen, dtype="float32",
                              window=None, backend="triton"))
    if world_size in (1, 8):
        cases.append(dict(layout="zigzag", causal=True, heads="gqa", seqlen=GROWTH_SEQLEN, dtype="float32",
                          window=None, backend="torch"))
    # MLA head dims (v narrower than q/k), softcap and sinks together, every layout at w <= 4, w = 8 once
    for layout in LAYOUTS if world_size <= 4 else ["zigzag"]:
        seqlen = world_size * (14 if layout == "zigzag" else 13)
        for causal, window in ((True, None), (False, (5, 3))):
            cases.append(dict(layout=layout, causal=causal, heads="gqa", seqlen=seqlen, dtype="float32",
                              window=window, backend="torch", **FEATURES))
    if world_size == 2:
        cases.append(dict(layout="zigzag", causal=True, heads="gqa", seqlen=28, dtype="float32", window=None,
                          backend="triton", **FEATURES))
    return cases


def run_case(rank, world_size, case):
    """Ring forward + backward on this rank; rank 0 returns errors vs the float64 reference."""
    from dist_attn import gather, ring_attention, shard

    nheads, nheads_kv = HEADS[case["heads"]]
    dtype = getattr(torch, case["dtype"])
    gen = torch.Generator().manual_seed(case["seqlen"])
    headdim_v, softcap = case.get("headdim_v", 16), case.get("softcap")
    q = torch.randn(2, case["seqlen"], nheads, 16, generator=gen)
    k = torch.randn(2, case["seqlen"], nheads_kv, 16, generator=gen)
    v = torch.randn(2, case["seqlen"], nheads_kv, headdim_v, generator=gen)
    dout = torch.randn(q.shape[:3] + (headdim_v,), generator=gen)
    sinks = torch.randn(nheads, generator=gen).requires_grad_() if case.get("sinks") else None
    q, k, v, dout = (x.to(dtype) for x in (q, k, v, dout))
    layout, causal, window = case["layout"], case["causal"], case["window"]
    local = [shard(x, layout=layout, rank=rank, world_size=world_size).requires_grad_() for x in (q, k, v)]
    out = ring_attention(*local, causal=causal, layout=layout, window=window, backend=case["backend"],
                         softcap=softcap, sinks=sinks)
    out.backward(shard(dout, layout=layout, rank=rank, world_size=world_size))
    results = [gather(t.detach(), layout=layout) for t in (out, *(x.grad for x in local))]
    names = ("out", "dq", "dk", "dv")
    if sinks is not None:  # each rank holds its rows' share of d sinks: the full gradient is their sum
        if world_size > 1:
            torch.distributed.all_reduce(sinks.grad)
        results.append(sinks.grad)
        names += ("dsinks",)
    if rank != 0:
        return None
    reference = reference_with_grads(q, k, v, dout, causal, window, softcap=softcap, sinks=sinks)
    ref_out, ref_grads = reference[0], reference[2:]
    errors = {name: max_error(got, ref) for name, got, ref in zip(names, results, (ref_out, *ref_grads))}
    errors["nan"] = any(torch.isnan(t).any().item() for t in results)
    if dtype != torch.float32:  # the bar for low precision: PyTorch's own error in that dtype
        from attention_checks import attention_lowp
        q16, k16, v16 = (x.detach().clone().requires_grad_() for x in (q, k, v))
        plain = attention_lowp(q16, k16, v16, causal=causal, window=window)
        plain_grads = torch.autograd.grad(plain, (q16, k16, v16), dout)
        errors["plain"] = {name: max_error(got, ref) for name, got, ref in
                           zip(names, (plain, *plain_grads), (ref_out, *ref_grads))}
    return errors


def run_all_cases(rank, world_size, cases):
    return {case_id(case): run_case(rank, world_size, case) for case in cases}


@functools.lru_cache(maxsize=None)
def world_results(world_size):
    return run_world(world_size, run_all_cases, cases_for(world_size), timeout=600)[0]


ALL_CASES = [(w, case) for w in WORLD_SIZES for case in cases_for(w)]


@pytest.mark.parametrize("world_size,case", ALL_CASES, ids=[f"w{w}-{case_id(c)}" for w, c in ALL_CASES])
def test_ring_matches_full_attention(world_size, case):
    errors = world_results(world_size)[case_id(case)]
    assert not errors["nan"], "NaN in ring output or gradients"
    if case["dtype"] == "float32":
        assert errors["out"] <= FWD_TOL, errors
        assert max(errors[name] for name in ("dq", "dk", "dv", "dsinks") if name in errors) <= GRAD_TOL, errors
    else:
        for name, plain in errors["plain"].items():
            assert errors[name] <= 2 * plain, f"{name}: {errors[name]:.3g} > 2x PyTorch's {plain:.3g}; {errors}"


def test_error_does_not_grow_with_world_size():
    growth = next(c for c in cases_for(8) if c["seqlen"] == GROWTH_SEQLEN)
    one, eight = world_results(1)[case_id(growth)], world_results(8)[case_id(growth)]
    for name in ("out", "dq", "dk", "dv"):
        assert eight[name] <= 2 * one[name], f"{name}: error {eight[name]:.3g} at w=8 vs {one[name]:.3g} at w=1"


# ------------------------------------------------------------------------------------ skipped work

def count_kernel_calls(rank, world_size, layout, causal):
    """Kernel launches of this rank's forward and backward."""
    import dist_attn.ring as ring

    calls = {"forward": 0, "backward": 0}
    real_forward, real_backward = ring.flash_attn_forward, ring.flash_attn_backward

    def counted(kind, real):
        def call(*args, **kwargs):
            calls[kind] += 1
            return real(*args, **kwargs)
        return call

    ring.flash_attn_forward = counted("forward", real_forward)
    ring.flash_attn_backward = counted("backward", real_backward)
    local = [torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(3)]
    ring.ring_attention(*local, causal=causal, layout=layout).sum().backward()
    return calls


@pytest.mark.parametrize("layout,causal,expected", [
    ("zigzag", True, lambda r, w: 2 * w + 1),   # own block: 3 half x half calls; every other step: 2
    ("zigzag", False, lambda r, w: 4 * w),
    ("contiguous", True, lambda r, w: r + 1),   # blocks of later ranks are skipped outright
    ("striped", True, lambda r, w: w),
])
def test_masked_steps_launch_no_kernel(layout, causal, expected):
    world_size = 4
    counts = run_world(world_size, count_kernel_calls, layout, causal, timeout=300)
    for rank, calls in enumerate(counts):
        assert calls == {"forward": expected(rank, world_size), "backward": expected(rank, world_size)}, (rank, calls)


# ---------------------------------------------------------------------------- disagreement, hangs

def mismatched_call(rank, world_size, field):
    """Rank 1 disagrees with rank 0 on ``field``; returns the error each rank raised."""
    from dist_attn import ring_attention

    shapes = {"q": (1, 8, 2, 8), "kv": (1, 8, 2, 8)}
    kwargs = {"causal": True, "layout": "zigzag"}
    if rank == 1:
        if field == "headdim":
            shapes = {"q": (1, 8, 2, 16), "kv": (1, 8, 2, 16)}
        elif field == "seqlen":
            shapes = {"q": (1, 10, 2, 8), "kv": (1, 10, 2, 8)}
        else:
            kwargs[field] = {"causal": False, "layout": "striped"}[field]
    q, k, v = torch.randn(shapes["q"]), torch.randn(shapes["kv"]), torch.randn(shapes["kv"])
    try:
        ring_attention(q, k, v, **kwargs)
    except ValueError as error:
        return str(error)
    return "no error"


@pytest.mark.parametrize("field,name", [("headdim", "headdim"), ("seqlen", "local seqlen"),
                                        ("causal", "causal"), ("layout", "layout")])
def test_ranks_that_disagree_all_raise(field, name):
    start = time.monotonic()
    messages = run_world(2, mismatched_call, field, timeout=120)
    assert all("differ across ranks" in m and name in m for m in messages), messages
    assert time.monotonic() - start < 120


def one_rank_skips_the_ring(rank, world_size):
    from dist_attn import ring_attention

    if rank == 0:
        local = torch.randn(1, 8, 1, 8)
        ring_attention(local, local, local, check_peers=False)  # waits for a peer that never sends
    return "done"


def test_a_missing_peer_fails_within_the_process_group_timeout():
    start = time.monotonic()
    with pytest.raises(WorldFailed, match="rank 0"):
        run_world(2, one_rank_skips_the_ring, timeout=120, pg_timeout_s=5)
    assert time.monotonic() - start < 100


# ------------------------------------------------------------------------------------ single rank

def test_world_of_one_without_process_group():
    from dist_attn import ring_attention
    from dist_attn.kernels import flash_attn_func

    q, k, v = (torch.randn(1, 24, 2, 16, requires_grad=True) for _ in range(3))
    for layout in LAYOUTS:
        out = ring_attention(q, k, v, causal=True, layout=layout)
        torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(layout="ring"), ValueError, "layout must be one of"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(window=(1,)), ValueError, "window must be None or a pair"),
    (dict(group=object()), ValueError, "torch.distributed is not initialised"),
])
def test_bad_arguments(kwargs, exc, message):
    from dist_attn import ring_attention

    x = torch.randn(1, 8, 2, 8)
    with pytest.raises(exc, match=message):
        ring_attention(x, x, x, **kwargs)


def test_odd_local_length_with_zigzag_is_an_error():
    from dist_attn import ring_attention

    x = torch.randn(1, 7, 2, 8)
    with pytest.raises(ValueError, match="must be even for layout='zigzag'"):
        ring_attention(x, x, x, layout="zigzag")


def test_q_and_k_must_hold_the_same_tokens():
    from dist_attn import ring_attention

    with pytest.raises(ValueError, match="same tokens"):
        ring_attention(torch.randn(1, 8, 2, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8), layout="striped")
