"""MLA head dims (v narrower or wider than q/k), logit softcapping and attention sinks in the single-device
kernels, both backends (Triton under the interpreter on CPU), against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from attention_checks import attention_lowp, max_error, reference_with_grads
from dist_attn.kernels import attention_reference, flash_attn_forward, flash_attn_func, flash_attn_varlen_func
from test_kernels import BACKENDS, FWD_TOL, GRAD_TOL, device_for, run_fp32_case

# forward + backward at explicit positions (flash_attn_forward / _backward): head dims and softcap
BLOCK_CASES = {
    "mla_gqa_causal": dict(seqlen_q=70, seqlen_k=70, nheads=4, nheads_kv=2, headdim=48, headdim_v=24, causal=True),
    "mla_192_128": dict(seqlen_q=40, seqlen_k=40, nheads=2, nheads_kv=1, headdim=192, headdim_v=128, causal=True),
    "v_wider": dict(seqlen_q=33, seqlen_k=47, headdim=16, headdim_v=64),
    "softcap_odd": dict(seqlen_q=37, seqlen_k=53, softcap=2.0),
    "softcap_mla_window": dict(seqlen_q=65, seqlen_k=65, headdim=32, headdim_v=16, window=(9, 4), softcap=1.5),
    "softcap_strided": dict(seqlen_q=50, seqlen_k=45, q_offset=5, q_stride=3, k_offset=2, k_stride=2,
                            window=(20, 10), softcap=3.0, headdim_v=8),
    "softcap_future_keys": dict(seqlen_q=20, seqlen_k=20, k_offset=100, causal=True, softcap=2.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", BLOCK_CASES)
def test_head_dims_and_softcap(backend, name):
    masked_rows = run_fp32_case(backend, **BLOCK_CASES[name])  # asserts out, lse and gradients
    assert masked_rows.all() == (name == "softcap_future_keys")


def sink_inputs(backend, seqlen_q, seqlen_k, nheads, nheads_kv, headdim, headdim_v, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    device = device_for(backend)
    shapes = ((seqlen_q, nheads, headdim), (seqlen_k, nheads_kv, headdim), (seqlen_k, nheads_kv, headdim_v),
              (seqlen_q, nheads, headdim_v))
    q, k, v, dout = (torch.randn(1, *shape, generator=gen).to(device, dtype) for shape in shapes)
    sinks = torch.randn(nheads, generator=gen).to(device)
    return q, k, v, dout, sinks


SINK_CASES = {
    "gqa_causal": dict(seqlen_q=67, seqlen_k=67, nheads=4, nheads_kv=2, headdim=32, headdim_v=32, causal=True),
    "sliding": dict(seqlen_q=50, seqlen_k=50, nheads=2, nheads_kv=2, headdim=16, headdim_v=16, causal=True,
                    window=(3, 0)),
    "all_three": dict(seqlen_q=45, seqlen_k=61, nheads=4, nheads_kv=1, headdim=24, headdim_v=8, causal=False,
                      softcap=2.5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", SINK_CASES.values(), ids=SINK_CASES.keys())
def test_sinks_forward_and_gradients(backend, case):
    case = dict(case)
    causal, window, softcap = case.pop("causal"), case.pop("window", None), case.pop("softcap", None)
    q, k, v, dout, sinks = sink_inputs(backend, **case)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out, lse = flash_attn_func(*leaves[:3], causal=causal, window=window, softcap=softcap, sinks=leaves[3],
                               return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_out, ref_lse, *ref_grads = reference_with_grads(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal, window,
                                                        softcap=softcap, sinks=sinks.cpu())
    assert max_error(out.cpu(), ref_out) <= FWD_TOL and max_error(lse.cpu(), ref_lse) <= FWD_TOL
    errors = {name: max_error(g.cpu(), r) for name, g, r in zip(("dq", "dk", "dv", "dsinks"), grads, ref_grads)}
    assert max(errors.values()) <= GRAD_TOL, errors
    assert grads[3].dtype == sinks.dtype and grads[3].abs().min() > 0  # every head's sink gets a gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sink_keeps_rows_that_see_no_key_finite(backend):
    """window (0, 0) with 40 queries and 20 keys: rows 20.. see no key. With a sink they give out 0, LSE = the
    sink, zero gradients and no NaN; without one, LSE -inf."""
    q, k, v, dout, sinks = sink_inputs(backend, 40, 20, 2, 2, 16, 16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out, lse = flash_attn_func(*leaves[:3], window=(0, 0), sinks=leaves[3], return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    assert torch.all(out[:, 20:] == 0) and torch.equal(lse[0, :, 20:], sinks[:, None].expand(2, 20))
    assert not any(torch.isnan(g).any() for g in grads) and torch.all(grads[0][:, 20:] == 0)
    ref_out, ref_lse, *ref_grads = reference_with_grads(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), window=(0, 0),
                                                        sinks=sinks.cpu())
    assert max_error(out.cpu(), ref_out) <= FWD_TOL and max_error(lse.cpu(), ref_lse) <= FWD_TOL
    assert max(max_error(g.cpu(), r) for g, r in zip(grads, ref_grads)) <= GRAD_TOL
    _, plain_lse = flash_attn_func(q, k, v, window=(0, 0), return_lse=True, backend=backend)
    assert torch.isneginf(plain_lse[0, :, 20:]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_sink_of_minus_infinity_is_no_sink(backend):
    """A head whose sink is -inf behaves as without sinks, also on rows that see no key (no NaN anywhere)."""
    q, k, v, dout, _ = sink_inputs(backend, 40, 20, 2, 2, 16, 16)
    sinks = torch.tensor([float("-inf"), 0.5], device=q.device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out, lse = flash_attn_func(*leaves[:3], window=(0, 0), sinks=leaves[3], return_lse=True, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    plain, plain_lse = flash_attn_func(q, k, v, window=(0, 0), return_lse=True, backend=backend)
    assert torch.equal(out[:, :, 0], plain[:, :, 0]) and torch.equal(lse[:, 0], plain_lse[:, 0])
    assert not any(torch.isnan(g).any() for g in grads) and grads[3][0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_with_all_three(backend):
    """flash_attn_varlen_func: every sequence sees its head's sink; d sinks sums over the sequences."""
    lengths = [1, 9, 30, 17]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    q, k, v, dout, sinks = (x[0] if x.dim() == 4 else x for x in sink_inputs(backend, 57, 57, 4, 2, 24, 8))
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out = flash_attn_varlen_func(*leaves[:3], cu_seqlens.to(q.device), causal=True, softcap=2.0, sinks=leaves[3],
                                 backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    bounds = cu_seqlens.tolist()
    refs = [reference_with_grads(*(x[None, a:b].cpu() for x in (q, k, v, dout)), True, softcap=2.0, sinks=sinks.cpu())
            for a, b in zip(bounds, bounds[1:])]
    expected = [torch.cat([ref[i][0] for ref in refs]) for i in (0, 2, 3, 4)] + [sum(ref[5] for ref in refs)]
    errors = [max_error(got.cpu(), ref) for got, ref in zip((out, *grads), expected)]
    assert errors[0] <= FWD_TOL and max(errors[1:]) <= GRAD_TOL, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_low_precision_within_2x_of_pytorch(backend):
    """bf16, MLA dims, softcap and sinks: every error at most 2x PyTorch's own bf16 error."""
    q, k, v, dout, sinks = sink_inputs(backend, 96, 96, 4, 2, 64, 32, torch.bfloat16, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    out = flash_attn_func(*leaves[:3], causal=True, softcap=5.0, sinks=leaves[3], backend=backend)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, leaves, dout)
    plain_leaves = [x.clone().requires_grad_() for x in (q, k, v, sinks)]
    plain = attention_lowp(*plain_leaves[:3], causal=True, softcap=5.0, sinks=plain_leaves[3])
    plain_grads = torch.autograd.grad(plain, plain_leaves, dout)
    ref_out, _, *ref_grads = reference_with_grads(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), True, softcap=5.0,
                                                  sinks=sinks.cpu())
    report = {}
    for name, ours, theirs, ref in zip(("out", "dq", "dk", "dv", "dsinks"), (out, *grads), (plain, *plain_grads),
                                       (ref_out, *ref_grads)):
        report[name] = (max_error(ours.cpu(), ref), max_error(theirs.cpu(), ref))
    assert all(ours <= 2 * theirs for ours, theirs in report.values()), report


def test_softcap_and_sinks_change_the_result():
    """Guards against a feature silently ignored: each one moves the output."""
    q, k, v, _, sinks = sink_inputs("torch", 20, 20, 2, 2, 16, 16)
    q = q * 4
    plain = flash_attn_func(q, k, v, causal=True)
    assert max_error(flash_attn_func(q, k, v, causal=True, softcap=1.0), plain) > 1e-2
    assert max_error(flash_attn_func(q, k, v, causal=True, sinks=sinks), plain) > 1e-2
    assert torch.equal(flash_attn_func(q, k, v, causal=True, softcap=0.0), plain)  # 0: off, as in flash-attn


X = torch.zeros(1, 8, 2, 16)


@pytest.mark.parametrize("kwargs,exc,message", [
    (dict(softcap=-1.0), ValueError, "softcap must be a positive finite number"),
    (dict(softcap=float("inf")), ValueError, "softcap must be a positive finite number"),
    (dict(softcap="50"), TypeError, "softcap must be a float or None; got str"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(nheads,\) = \(2,\)"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks.dtype must be a floating dtype"),
    (dict(sinks=[0.0, 0.0]), TypeError, "sinks must be a torch.Tensor"),
    (dict(sinks=torch.zeros(2, device="meta")), ValueError, "sinks must be on cpu"),
])
def test_bad_softcap_and_sinks(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        flash_attn_func(X, X, X, **kwargs)


def test_reference_and_block_entry_points_refuse_bad_softcap():
    with pytest.raises(ValueError, match="softcap"):
        attention_reference(X, X, X, softcap=-2.0)
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_forward(X, X, X, None, False, softcap=-2.0)
