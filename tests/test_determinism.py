"""Bit-identical results across runs on the same device: same inputs, same outputs and gradients.

The kernels (both backends; MHA, GQA, MQA; causal, window, offsets and strides; packed sequences) are
run twice in this process and compared with ``torch.equal``. The ring runs twice in one spawned world
of 3 (every layout; causal, window, GQA, packed) and each rank compares its own two results (output
and gradients) bit for bit: the merge order and the gradient accumulation order are fixed, not
decided by which message arrives first.
"""

from __future__ import annotations

import pytest
import torch

from dist_attn.kernels import flash_attn_backward, flash_attn_forward, flash_attn_func, flash_attn_varlen_func
from launch.spawn import run_world

KERNEL_CASES = {
    "mha-causal": dict(heads=(4, 4), causal=True, window=None, positions={}),
    "gqa-window": dict(heads=(4, 2), causal=False, window=(9, 4), positions={}),
    "mqa-causal-window": dict(heads=(4, 1), causal=True, window=(20, None), positions={}),
    "gqa-offsets-strides": dict(heads=(4, 2), causal=True, window=None,
                                positions=dict(q_offset=37, k_offset=5, q_stride=2, k_stride=3)),
}


def inputs(seqlen_q, seqlen_k, nheads, nheads_kv, headdim=24, batch=2, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, nheads, headdim, generator=gen)
    k, v = (torch.randn(batch, seqlen_k, nheads_kv, headdim, generator=gen) for _ in range(2))
    dout = torch.randn(batch, seqlen_q, nheads, headdim, generator=gen)
    return tuple(x.to(dtype) for x in (q, k, v, dout))


def assert_identical(first, second, names):
    for name, a, b in zip(names, first, second):
        assert torch.equal(a, b), f"{name} differs between two runs: max diff {(a.double() - b.double()).abs().max()}"


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", KERNEL_CASES.values(), ids=KERNEL_CASES.keys())
def test_kernel_forward_backward_is_deterministic(backend, case):
    """flash_attn_forward / flash_attn_backward (explicit positions) twice: identical out, lse, dq, dk, dv.
    The torch backend's sequence (300 > CHUNK) spans several tiles, so the online softmax crosses tiles."""
    seqlen = 300 if backend == "torch" else 70
    q, k, v, dout = inputs(seqlen, seqlen - 3, *case["heads"])

    def run():
        out, lse = flash_attn_forward(q, k, v, None, case["causal"], window=case["window"], backend=backend,
                                      **case["positions"])
        grads = flash_attn_backward(dout, q, k, v, out, lse, None, case["causal"], window=case["window"],
                                    backend=backend, **case["positions"])
        return out, lse, *grads

    assert_identical(run(), run(), ("out", "lse", "dq", "dk", "dv"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_autograd_and_varlen_are_deterministic(backend, dtype):
    """flash_attn_func and flash_attn_varlen_func through autograd, fp32 and bf16: identical twice."""
    q, k, v, dout = inputs(60, 60, 4, 2, dtype=dtype)
    cu_seqlens = torch.tensor([0, 1, 1, 50, 120], dtype=torch.int32)

    def run():
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = flash_attn_func(*leaves, causal=True, window=(11, 0), return_lse=True, backend=backend)
        grads = torch.autograd.grad(out, leaves, dout)
        packed = [x.reshape(-1, *x.shape[2:]).clone().requires_grad_() for x in (q, k, v)]
        out_p = flash_attn_varlen_func(*packed, cu_seqlens, causal=True, backend=backend)
        grads_p = torch.autograd.grad(out_p, packed, dout.reshape(-1, *dout.shape[2:]))
        return out, lse, *grads, out_p, *grads_p

    assert_identical(run(), run(), ("out", "lse", "dq", "dk", "dv", "varlen out", "varlen dq", "varlen dk",
                                    "varlen dv"))


RING_CASES = [
    dict(layout="zigzag", causal=True, window=None, heads=(4, 2), packed=False, backend="torch"),
    dict(layout="contiguous", causal=False, window=None, heads=(2, 2), packed=False, backend="torch"),
    dict(layout="striped", causal=True, window=(7, 0), heads=(4, 1), packed=False, backend="torch"),
    dict(layout="zigzag", causal=True, window=None, heads=(4, 2), packed=True, backend="torch"),
    dict(layout="striped", causal=False, window=(4, 6), heads=(2, 1), packed=True, backend="torch"),
    dict(layout="zigzag", causal=True, window=None, heads=(2, 1), packed=False, backend="triton"),
]


def ring_twice(rank, world_size, cases):
    """Per case: whether this rank's output and gradients are bit-identical across two runs
    (a description of the first difference otherwise)."""
    from dist_attn import ring_attention, shard

    verdicts = []
    for case in cases:
        layout, (nheads, nheads_kv) = case["layout"], case["heads"]
        q, k, v, dout = inputs(6 * world_size * 2, 6 * world_size * 2, nheads, nheads_kv, headdim=16, seed=3)
        kw = {}
        if case["packed"]:
            kw["cu_seqlens"] = torch.tensor([0, 1, 20, 20, 2 * q.shape[1]], dtype=torch.int32)
            q, k, v, dout = (x.reshape(-1, *x.shape[2:]) for x in (q, k, v, dout))
        local = [shard(x, layout, rank, world_size, **kw) for x in (q, k, v, dout)]

        def run():
            leaves = [x.clone().requires_grad_() for x in local[:3]]
            out = ring_attention(*leaves, causal=case["causal"], layout=layout, window=case["window"],
                                 backend=case["backend"], **kw)
            return out.detach(), *torch.autograd.grad(out, leaves, local[3])

        first, second = run(), run()
        diff = [name for name, a, b in zip(("out", "dq", "dk", "dv"), first, second) if not torch.equal(a, b)]
        verdicts.append(f"{diff} differ" if diff else "identical")
    return verdicts


def test_ring_is_deterministic():
    verdicts = run_world(3, ring_twice, RING_CASES, timeout=300)
    for rank, per_case in enumerate(verdicts):
        for case, verdict in zip(RING_CASES, per_case):
            assert verdict == "identical", f"rank {rank}, {case}: {verdict}"
