"""Packed variable-length sequences (``cu_seqlens`` and spans) against float64 attention per sequence."""

from __future__ import annotations

import pytest
import torch

from attention_checks import max_error, reference_with_grads
from conftest import DEVICE
from dist_attn.kernels import flash_attn_varlen_backward, flash_attn_varlen_forward, flash_attn_varlen_func

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
BACKENDS = ["torch", "triton"]
SEQLENS = [1, 7, 130, 515]  # divisible by nothing convenient
SEQLENS_INTERPRETED = [1, 7, 130, 67]  # the Triton interpreter is slow: the same shapes without the long one


def device_for(backend):
    return DEVICE if backend == "triton" else torch.device("cpu")


def cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def packed_inputs(total_q, total_k, nheads, nheads_kv, headdim=32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(total_q, nheads, headdim, generator=gen)
    k, v = (torch.randn(total_k, nheads_kv, headdim, generator=gen) for _ in range(2))
    dout = torch.randn(total_q, nheads, headdim, generator=gen)
    return (t.to(device) for t in (q, k, v, dout))


def expected(q, k, v, dout, q_spans, k_spans, causal, window, q_stride=1, k_stride=1):
    """float64 reference, one sequence at a time; rows outside every span: out 0, lse -inf, grads 0."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float64)
    dq, dk, dv = (torch.zeros(t.shape, dtype=torch.float64) for t in (q, k, v))
    for (qs, ql, qo), (ks, kl, ko) in zip(q_spans, k_spans):
        if ql == 0 or kl == 0:
            continue
        rows, cols = slice(qs, qs + ql), slice(ks, ks + kl)
        q_pos, k_pos = qo + q_stride * torch.arange(ql), ko + k_stride * torch.arange(kl)
        o, l, gq, gk, gv = reference_with_grads(q[None, rows], k[None, cols], v[None, cols], dout[None, rows],
                                                causal, window, q_pos, k_pos)
        out[rows], lse[:, rows] = o[0], l[0]
        dq[rows], dk[cols], dv[cols] = gq[0], gk[0], gv[0]
    return out, lse, dq, dk, dv


def assert_close(actual, reference):
    out, lse, dq, dk, dv = (t.cpu() for t in actual)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference
    for name, t in (("out", out), ("lse", lse), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"NaN in {name}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "lse must be -inf exactly on rows that see no key"
    assert torch.all(out.transpose(0, 1)[empty] == 0), "rows that see no key must output 0"
    fwd = {"out": max_error(out, ref_out), "lse": max_error(lse[~empty], ref_lse[~empty])}
    grads = {"dq": max_error(dq, ref_dq), "dk": max_error(dk, ref_dk), "dv": max_error(dv, ref_dv)}
    assert max(fwd.values()) <= FWD_TOL, f"forward error {fwd}"
    assert max(grads.values()) <= GRAD_TOL, f"gradient error {grads}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1)], ids=["mha", "mqa"])
def test_varlen_func_matches_per_sequence_reference(backend, causal, heads):
    """flash_attn_varlen_func forward and autograd backward; no attention across sequences."""
    device = device_for(backend)
    lengths = SEQLENS_INTERPRETED if backend == "triton" and device.type == "cpu" else SEQLENS
    total = sum(lengths)
    q, k, v, dout = packed_inputs(total, total, *heads, device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_varlen_func(q, k, v, cu(lengths).to(device), causal=causal, return_lse=True,
                                      backend=backend)
    out.backward(dout)
    spans = [(int(s), n, 0) for s, n in zip(cu(lengths)[:-1], lengths)]
    reference = expected(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), dout.cpu(), spans, spans, causal, None)
    assert_close((out.detach(), lse, q.grad, k.grad, v.grad), reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("window", [(0, 0), (5, None), (40, 3)])
def test_varlen_window_and_different_q_k_lengths(backend, window):
    """Separate cu_seqlens for q and k (cross-attention shaped), a zero-length sequence, GQA, windows."""
    device = device_for(backend)
    q_lengths, k_lengths = [9, 0, 70, 33], [17, 4, 64, 1]
    q, k, v, dout = packed_inputs(sum(q_lengths), sum(k_lengths), 4, 2, seed=1, device=device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_varlen_func(q, k, v, cu(q_lengths).to(device), cu(k_lengths).to(device), causal=False,
                                      window=window, return_lse=True, backend=backend)
    out.backward(dout)
    q_spans = [(int(s), n, 0) for s, n in zip(cu(q_lengths)[:-1], q_lengths)]
    k_spans = [(int(s), n, 0) for s, n in zip(cu(k_lengths)[:-1], k_lengths)]
    reference = expected(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), dout.cpu(), q_spans, k_spans,
                         False, window)
    assert_close((out.detach(), lse, q.grad, k.grad, v.grad), reference)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_spans_with_offsets_strides_and_uncovered_rows(backend, causal):
    """The ring's call: spans out of order, at offsets and strides, with rows no span covers (padding)."""
    device = device_for(backend)
    q, k, v, dout = packed_inputs(120, 100, 2, 2, seed=2, device=device)
    q_spans = [(60, 50, 40), (0, 33, 0), (40, 3, 1000)]   # rows 33..39 and 110..119 belong to nothing
    k_spans = [(0, 45, 10), (50, 50, 0), (45, 5, 999)]
    out, lse = flash_attn_varlen_forward(q, k, v, None, causal, q_spans, k_spans, q_stride=3, k_stride=2,
                                         backend=backend)
    grads = flash_attn_varlen_backward(dout, q, k, v, out, lse, None, causal, q_spans, k_spans, q_stride=3,
                                       k_stride=2, backend=backend)
    reference = expected(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), q_spans, k_spans, causal, None, 3, 2)
    assert_close((out, lse, *grads), reference)
    assert torch.all(out[33:40] == 0) and torch.all(grads[0][110:] == 0)


def test_out_dtype_and_bf16_rounding():
    q, k, v, _ = packed_inputs(20, 20, 2, 2)
    spans = [(0, 20, 0)]
    out32, _ = flash_attn_varlen_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True, spans, spans,
                                         out_dtype=torch.float32)
    out16, _ = flash_attn_varlen_forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), None, True, spans, spans)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert torch.equal(out32.bfloat16(), out16)


def test_bad_cu_seqlens_and_spans_raise_clear_errors():
    q, k, v, _ = packed_inputs(10, 10, 2, 2)
    good = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match=r"cu_seqlens_q.dtype must be torch.int32"):
        flash_attn_varlen_func(q, k, v, good.long())
    with pytest.raises(TypeError, match=r"cu_seqlens_q must be a torch.Tensor"):
        flash_attn_varlen_func(q, k, v, [0, 4, 10])
    with pytest.raises(ValueError, match=r"non-decreasing.*cu_seqlens_q\[2\] = 3 < cu_seqlens_q\[1\] = 4"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 4, 3, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[-1\] must equal the number of packed tokens \(10\); got 9"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_q\[0\] must be 0"):
        flash_attn_varlen_func(q, k, v, torch.tensor([1, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"1-D with batch \+ 1 >= 2"):
        flash_attn_varlen_func(q, k, v, torch.tensor([10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens_k\[-1\] must equal the number of packed tokens \(10\)"):
        flash_attn_varlen_func(q, k, v, good, torch.tensor([0, 4, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"same number of sequences"):
        flash_attn_varlen_func(q, k, v, good, torch.tensor([0, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"q must be 3-D \(total_tokens, nheads, headdim\)"):
        flash_attn_varlen_func(q[None], k, v, good)
    with pytest.raises(ValueError, match=r"cu_seqlens_k is required"):
        flash_attn_varlen_func(q, k[:8], v[:8], good)
    with pytest.raises(ValueError, match=r"q_spans must not overlap"):
        flash_attn_varlen_forward(q, k, v, None, False, [(0, 5, 0), (4, 3, 0)], [(0, 5, 0), (5, 5, 0)])
    with pytest.raises(ValueError, match=r"k_spans\[1\] = \(5, 6, 0\) must lie inside the 10 packed rows"):
        flash_attn_varlen_forward(q, k, v, None, False, [(0, 5, 0), (5, 5, 0)], [(0, 5, 0), (5, 6, 0)])
    with pytest.raises(ValueError, match=r"same sequences; got 2 and 1"):
        flash_attn_varlen_forward(q, k, v, None, False, [(0, 5, 0), (5, 5, 0)], [(0, 10, 0)])
    with pytest.raises(TypeError, match=r"q_spans\[0\] must be a tuple \(start, length, offset\) of ints"):
        flash_attn_varlen_forward(q, k, v, None, False, [(0, 5)], [(0, 10, 0)])


# ------------------------------------------------------------------------------ Triton: one launch per kernel

class _LaunchLog:
    """Stands in for a Triton kernel and records the grid of every launch (``kernel[grid](...)``)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid(dict(BLOCK_M=32, BLOCK_N=32)) if callable(grid) else grid)
        return self.kernel[grid]


def test_triton_packs_every_sequence_into_one_launch_per_kernel(monkeypatch):
    """Three sequences, GQA: one launch of each kernel, grid axis 1 = sequences x heads, axis 0 = the
    longest sequence; the short sequences' surplus programs change nothing."""
    from dist_attn.kernels import triton_attention as ta

    logs = {name: _LaunchLog(getattr(ta, name)) for name in ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv", "_bwd_dq")}
    for name, log in logs.items():
        monkeypatch.setattr(ta, name, log)
    lengths = [40, 7, 75]
    q, k, v, dout = packed_inputs(sum(lengths), sum(lengths), 4, 2, seed=3, device=DEVICE)
    spans = [(int(s), n, 0) for s, n in zip(cu(lengths)[:-1], lengths)]
    out, lse = flash_attn_varlen_forward(q, k, v, None, True, spans, spans, backend="triton")
    grads = flash_attn_varlen_backward(dout, q, k, v, out, lse, None, True, spans, spans, backend="triton")
    assert {name: len(log.grids) for name, log in logs.items()} == dict.fromkeys(logs, 1)
    assert tuple(logs["_fwd_kernel"].grids[0]) == (3, 3 * 4)     # cdiv(75, 32) query tiles, 3 sequences x 4 heads
    assert tuple(logs["_bwd_dkdv"].grids[0]) == (3, 3 * 2)       # per KV head
    assert tuple(logs["_bwd_dq"].grids[0]) == (3, 3 * 4)
    assert_close((out, lse, *grads), expected(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), spans, spans, True, None))


@pytest.mark.parametrize("out_dtype", [None, torch.float32], ids=["bf16_out", "fp32_out"])
def test_triton_bf16_packed_matches_one_call_per_sequence(out_dtype):
    """bfloat16: the packed launch gives each sequence what a separate (batched-path) call at the same
    positions gives it: bit for bit under the interpreter (same tiles), to bf16 rounding on a GPU
    (where the autotuner may pick other tiles). Uncovered rows stay 0 / -inf / 0."""
    from dist_attn.kernels import flash_attn_backward, flash_attn_forward

    q, k, v, dout = (t.bfloat16() for t in packed_inputs(90, 80, 2, 1, seed=4, device=DEVICE))
    q_spans, k_spans = [(50, 35, 7), (0, 45, 0)], [(40, 40, 3), (0, 33, 0)]   # rows 45..49, 85..89: padding
    out, lse = flash_attn_varlen_forward(q, k, v, None, True, q_spans, k_spans, q_stride=2, backend="triton",
                                         out_dtype=out_dtype)
    grads = flash_attn_varlen_backward(dout, q, k, v, out.to(q.dtype), lse, None, True, q_spans, k_spans,
                                       q_stride=2, backend="triton")
    assert out.dtype == (out_dtype or torch.bfloat16)
    tol = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=2e-2, atol=2e-2)
    for (qs, ql, qo), (ks, kl, ko) in zip(q_spans, k_spans):
        rows, cols = slice(qs, qs + ql), slice(ks, ks + kl)
        one_out, one_lse = flash_attn_forward(q[None, rows], k[None, cols], v[None, cols], None, True, qo, ko, 2,
                                              backend="triton", out_dtype=out_dtype)
        one_grads = flash_attn_backward(dout[None, rows], q[None, rows], k[None, cols], v[None, cols],
                                        one_out.to(q.dtype), one_lse, None, True, qo, ko, 2, backend="triton")
        torch.testing.assert_close(out[rows], one_out[0], **tol)
        torch.testing.assert_close(lse[:, rows], one_lse[0], **tol)
        for grad, one, span in zip(grads, one_grads, (rows, cols, cols)):
            torch.testing.assert_close(grad[span], one[0], **tol)
    padding = torch.cat([torch.arange(45, 50), torch.arange(85, 90)])
    assert torch.all(out[padding] == 0) and torch.all(torch.isneginf(lse[:, padding]))
    assert torch.all(grads[0][padding] == 0)
