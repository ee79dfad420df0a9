"""Bad and edge-case input on every public function: clear errors, and documented behaviour for the rest.

Errors name the argument and what was expected (matched with ``pytest.raises(match=...)``). The
argument checks shared by the kernels are tested in test_kernels.py for ``flash_attn_func``; here the
same checks are run through every other public entry point, plus the gaps: non-finite or tensor
softmax_scale, odd window/causal types, zero heads or headdim, wrong devices in the backward, bad
``dim``/rank/world_size/layout for shard, gather and global_positions, and bad degrees.

Documented behaviour (not errors), both backends:

- NaN or Inf in ``q`` at (row i, head h): output and LSE of exactly that row and head are not finite;
  every other row is bit-identical to the result without it. Never raises.
- NaN in ``k`` at key j: the rows that see key j get NaN; rows that do not see it (masked by causal or
  window) are bit-identical to the clean result.
- NaN or Inf in ``v`` at key j: the rows that see key j are not finite; other rows MAY be NaN as well
  (P = 0 times Inf/NaN is NaN inside a tile, as in PyTorch's own attention), so no promise is made
  for them. Never raises.
- Sequence length 0 (q or k, dense or packed, or a batch of 0): no error; output of the right
  (empty) shape, LSE -inf for queries with no keys, zero-size or zero gradients.
- Zero-length shards (local seqlen 0) in ``ring_attention``, world 1 and 2: empty output and gradients.
- Non-contiguous inputs (transposed, strided slices, expanded K/V, permuted dout): the results of the
  contiguous copies within 1e-6 (forward) and 1e-5 (gradients): BLAS may take another summation order
  for strided operands, so the last bits of the gradients can differ.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from dist_attn import (gather, global_positions, heads_to_seq, ring_attention, seq_to_heads, shard, usp_attention,
                       usp_gather, usp_shard)
from dist_attn.groups import sequence_parallel_groups
from dist_attn.kernels import (attention_reference, flash_attn_backward, flash_attn_forward, flash_attn_func,
                     flash_attn_varlen_backward, flash_attn_varlen_forward, flash_attn_varlen_func)
from launch.spawn import run_world

BACKENDS = ["torch", "triton"]
Q, KV = torch.zeros(1, 8, 4, 16), torch.zeros(1, 8, 2, 16)
CU = torch.tensor([0, 3, 8], dtype=torch.int32)
SPANS = [(0, 3, 0), (3, 5, 0)]


# Every public attention entry point, called with (q, k, v) and keyword overrides.
def _func(q, k, v, **kw):
    return flash_attn_func(q, k, v, **kw)


def _forward(q, k, v, causal=False, softmax_scale=None, **kw):
    return flash_attn_forward(q, k, v, softmax_scale, causal, **kw)


def _backward(q, k, v, causal=False, softmax_scale=None, **kw):
    lse = torch.zeros(q.shape[0], q.shape[2], q.shape[1]) if isinstance(q, torch.Tensor) and q.dim() == 4 else Q
    return flash_attn_backward(q, q, k, v, q, lse, softmax_scale, causal, **kw)


def _packed(x):
    return x[0] if isinstance(x, torch.Tensor) and x.dim() == 4 else x


def _varlen_func(q, k, v, **kw):
    return flash_attn_varlen_func(_packed(q), _packed(k), _packed(v), CU, **kw)


def _varlen_forward(q, k, v, causal=False, softmax_scale=None, **kw):
    return flash_attn_varlen_forward(_packed(q), _packed(k), _packed(v), softmax_scale, causal, SPANS, SPANS, **kw)


def _varlen_backward(q, k, v, causal=False, softmax_scale=None, **kw):
    qp = _packed(q)
    lse = torch.zeros(qp.shape[1], qp.shape[0]) if isinstance(qp, torch.Tensor) and qp.dim() == 3 else Q
    return flash_attn_varlen_backward(qp, qp, _packed(k), _packed(v), qp, lse, softmax_scale, causal, SPANS, SPANS,
                                      **kw)


def _ring(q, k, v, **kw):
    return ring_attention(q, k, v, layout="contiguous", **kw)


def _usp(q, k, v, **kw):
    return usp_attention(q, k, v, layout="contiguous", **kw)


ENTRY_POINTS = {"flash_attn_func": _func, "flash_attn_forward": _forward, "flash_attn_backward": _backward,
                "flash_attn_varlen_func": _varlen_func, "flash_attn_varlen_forward": _varlen_forward,
                "flash_attn_varlen_backward": _varlen_backward, "ring_attention": _ring, "usp_attention": _usp}

BAD_CALLS = {
    "q_5d": ((torch.zeros(1, 1, 8, 4, 16), KV, KV), {}, ValueError, r"q must be (4|3)-D"),
    "k_2d": ((Q, torch.zeros(8, 2), KV), {}, ValueError, r"k must be (4|3)-D"),
    "v_not_tensor": ((Q, KV, "v"), {}, TypeError, "v must be a torch.Tensor"),
    "complex": ((Q.cfloat(), KV.cfloat(), KV.cfloat()), {}, TypeError, r"q.dtype must be one of float16, bfloat16"),
    "int_k": ((Q, KV.int(), KV), {}, TypeError, r"k.dtype must be one of"),
    "mixed_dtypes": ((Q, KV.bfloat16(), KV.bfloat16()), {}, TypeError, "q, k, v must share one dtype"),
    "meta_k": ((Q, KV.to("meta"), KV), {}, ValueError, r"q, k, v must be on one device; got q=cpu, k=meta"),
    "v_heads": ((Q, KV, torch.zeros(1, 8, 1, 16)), {}, ValueError,
                r"k and v must have the same \(batch, seqlen, nheads_kv\)"),
    "headdim_0": ((torch.zeros(1, 8, 4, 0), torch.zeros(1, 8, 2, 0), torch.zeros(1, 8, 2, 0)), {}, ValueError,
                  "headdim_qk must be between 1 and 256; got headdim_qk = 0"),
    "headdim_v_0": ((Q, KV, torch.zeros(1, 8, 2, 0)), {}, ValueError,
                    "headdim_v must be between 1 and 256; got headdim_qk = 16, headdim_v = 0"),
    "nheads_kv_0": ((Q, torch.zeros(1, 8, 0, 16), torch.zeros(1, 8, 0, 16)), {}, ValueError,
                    r"nheads \(4\) must be divisible by nheads_kv \(0\)"),
    "gqa_3": ((Q, torch.zeros(1, 8, 3, 16), torch.zeros(1, 8, 3, 16)), {}, ValueError,
              r"nheads \(4\) must be divisible by nheads_kv \(3\)"),
    "scale_inf": ((Q, KV, KV), {"softmax_scale": math.inf}, ValueError, "softmax_scale must be a positive finite"),
    "scale_nan": ((Q, KV, KV), {"softmax_scale": math.nan}, ValueError, "softmax_scale must be a positive finite"),
    "scale_0": ((Q, KV, KV), {"softmax_scale": 0.0}, ValueError, "softmax_scale must be a positive finite"),
    "scale_tensor": ((Q, KV, KV), {"softmax_scale": torch.tensor(0.5)}, TypeError,
                     "softmax_scale must be a float or None; got Tensor"),
    "scale_bool": ((Q, KV, KV), {"softmax_scale": True}, TypeError, "softmax_scale must be a float or None; got bool"),
    "causal_int": ((Q, KV, KV), {"causal": 1}, TypeError, "causal must be a bool; got int"),
    "causal_none": ((Q, KV, KV), {"causal": None}, TypeError, "causal must be a bool; got NoneType"),
    "causal_numpy": ((Q, KV, KV), {"causal": np.bool_(True)}, TypeError, "causal must be a bool"),
    "window_bool": ((Q, KV, KV), {"window": (True, 1)}, ValueError, r"window left must be an int >= 0 or None; got True"),
    "window_nan": ((Q, KV, KV), {"window": (1, math.nan)}, ValueError, "window right must be an int >= 0 or None"),
    "window_int": ((Q, KV, KV), {"window": 4}, ValueError, r"window must be None or a pair \(left, right\)"),
    "window_dict": ((Q, KV, KV), {"window": {0: 1, 1: 2}}, ValueError, r"window must be None or a pair"),
    "backend": ((Q, KV, KV), {"backend": "cuda"}, ValueError, r"backend must be one of \('triton', 'torch'\)"),
}


@pytest.mark.parametrize("entry,bad", [(e, b) for b in BAD_CALLS for e in ENTRY_POINTS
                                       if (e, b) != ("usp_attention", "backend")])  # usp_attention has no backend
def test_every_entry_point_rejects_bad_arguments(entry, bad):
    args, kwargs, exc, message = BAD_CALLS[bad]
    with pytest.raises(exc, match=message):
        ENTRY_POINTS[entry](*args, **kwargs)


@pytest.mark.parametrize("which", ["dout", "out", "lse"])
def test_backward_rejects_tensors_on_another_device(which):
    args = {"dout": Q, "out": Q, "lse": torch.zeros(1, 4, 8)}
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} must be on cpu; got meta"):
        flash_attn_backward(args["dout"], Q, KV, KV, args["out"], args["lse"], None, False)
    packed = {"dout": Q[0], "out": Q[0], "lse": torch.zeros(4, 8)}
    packed[which] = packed[which].to("meta")
    with pytest.raises(ValueError, match=f"{which} must be on cpu; got meta"):
        flash_attn_varlen_backward(packed["dout"], Q[0], KV[0], KV[0], packed["out"], packed["lse"], None, False,
                                   SPANS, SPANS)


def test_varlen_span_and_stride_errors():
    with pytest.raises(TypeError, match=r"q_spans must be a list of \(start, length, offset\) tuples; got dict"):
        flash_attn_varlen_forward(Q[0], KV[0], KV[0], None, False, {}, SPANS)
    with pytest.raises(ValueError, match=r"k_stride must be an int >= 1; got 0"):
        flash_attn_varlen_forward(Q[0], KV[0], KV[0], None, False, SPANS, SPANS, k_stride=0)
    with pytest.raises(ValueError, match=r"q_spans\[0\] = \(0, -1, 0\) must lie inside the 8 packed rows"):
        flash_attn_varlen_forward(Q[0], KV[0], KV[0], None, False, [(0, -1, 0), (3, 5, 0)], SPANS)


# ------------------------------------------------------------------------------ NaN and Inf in inputs

def _rows_nonfinite(out):
    """(batch, row, head) index triples with a non-finite output."""
    return {tuple(i) for i in (~torch.isfinite(out)).any(-1).nonzero().tolist()}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_q_stays_in_its_row(backend, value):
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 24, 4, 16, generator=gen), torch.randn(2, 24, 2, 16, generator=gen), \
        torch.randn(2, 24, 2, 16, generator=gen)
    clean, clean_lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
    q[1, 7, 2, 3] = value
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
    assert _rows_nonfinite(out) == {(1, 7, 2)}
    assert not math.isfinite(lse[1, 2, 7].item())
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[1, 7, 2] = False
    assert torch.equal(out[keep], clean[keep])
    lse_keep = torch.ones_like(lse, dtype=torch.bool)
    lse_keep[1, 2, 7] = False
    assert torch.equal(lse[lse_keep], clean_lse[lse_keep])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs,seeing", [
    (dict(causal=True), lambda row: row >= 9),                          # key 9: rows 9.. see it
    (dict(causal=False, window=(2, 1)), lambda row: 8 <= row <= 11),    # |row - 9| within (left 2, right 1)
])
def test_nan_in_k_reaches_exactly_the_rows_that_see_it(backend, kwargs, seeing):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=gen) for _ in range(3))
    clean = flash_attn_func(q, k, v, backend=backend, **kwargs)
    k[0, 9, 1, 0] = math.nan
    out = flash_attn_func(q, k, v, backend=backend, **kwargs)
    expected = {(0, row, 1) for row in range(24) if seeing(row)}  # KV head 1 is read by query head 1 only
    assert _rows_nonfinite(out) == expected
    rows = torch.tensor([not seeing(r) for r in range(24)])
    assert torch.equal(out[:, rows], clean[:, rows])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_v_reaches_the_rows_that_see_it_and_never_raises(backend, value):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 24, 2, 16, generator=gen) for _ in range(3))
    v[0, 9, 0, 5] = value
    out = flash_attn_func(q, k, v, causal=True, backend=backend)
    seeing = {(0, row, 0) for row in range(9, 24)}
    assert seeing <= _rows_nonfinite(out)  # rows before 9 are not promised to stay finite (0 * inf = nan)


# ------------------------------------------------------------------------------- empty sequences

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seqlen_q,seqlen_k,batch", [(0, 8, 1), (8, 0, 1), (0, 0, 2), (8, 8, 0)])
def test_empty_sequences(backend, seqlen_q, seqlen_k, batch):
    q = torch.randn(batch, seqlen_q, 4, 16, requires_grad=True)
    k, v = (torch.randn(batch, seqlen_k, 2, 16, requires_grad=True) for _ in range(2))
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (batch, 4, seqlen_q)
    if seqlen_k == 0:  # queries with no keys
        assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad.shape == x.shape and torch.all(x.grad == 0)  # nothing to attend: zero gradients


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_of_length_zero(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(7, 2, 8, generator=gen).requires_grad_() for _ in range(3))
    cu_seqlens = torch.tensor([0, 0, 3, 3, 7, 7], dtype=torch.int32)  # lengths 0, 3, 0, 4, 0
    out = flash_attn_varlen_func(q, k, v, cu_seqlens, causal=True, backend=backend)
    for start, end in ((0, 3), (3, 7)):
        expected = flash_attn_func(q[None, start:end], k[None, start:end], v[None, start:end], causal=True,
                                   backend=backend)[0]
        torch.testing.assert_close(out[start:end], expected, rtol=0, atol=1e-6)
    empty = torch.zeros(0, 2, 8, requires_grad=True)
    out, lse = flash_attn_varlen_func(empty, empty, empty, torch.tensor([0, 0], dtype=torch.int32),
                                      return_lse=True, backend=backend)
    assert out.shape == (0, 2, 8) and lse.shape == (2, 0)
    out.sum().backward()
    assert empty.grad.shape == (0, 2, 8)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_ring_zero_length_shard_world_one(layout):
    q = torch.randn(2, 0, 4, 8, requires_grad=True)
    k, v = (torch.randn(2, 0, 2, 8, requires_grad=True) for _ in range(2))
    out = ring_attention(q, k, v, causal=True, layout=layout)
    assert out.shape == q.shape
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


# --------------------------------------------------------------------------- non-contiguous inputs

@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs_equal_contiguous(backend):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 20, 16, generator=gen).transpose(1, 2)                 # (2, 20, 4, 16), heads-major
    k = torch.randn(2, 40, 2, 16, generator=gen)[:, ::2]                         # every other token
    v = torch.randn(2, 20, 1, 16, generator=gen).expand(2, 20, 2, 16)            # stride 0 over heads
    dout = torch.randn(2, 16, 20, 4, generator=gen).permute(0, 2, 3, 1)
    assert not any(x.is_contiguous() for x in (q, k, v, dout))

    def run(q, k, v, dout):
        leaves = [x.detach().requires_grad_() for x in (q, k, v)]
        out, lse = flash_attn_func(*leaves, causal=True, window=(6, 2), return_lse=True, backend=backend)
        return out, lse, *torch.autograd.grad(out, leaves, dout)

    for name, got, expected, tol in zip(("out", "lse", "dq", "dk", "dv"), run(q, k, v, dout),
                                        run(*(x.contiguous() for x in (q, k, v, dout))), (1e-6, 1e-6, 1e-5, 1e-5, 1e-5)):
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=name)
    packed = [x[0] for x in (q, k, v)]
    cu_seqlens = torch.tensor([0, 5, 20], dtype=torch.int32)
    got = flash_attn_varlen_func(*packed, cu_seqlens, causal=True, backend=backend)
    expected = flash_attn_varlen_func(*(x.contiguous() for x in packed), cu_seqlens, causal=True, backend=backend)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_ring_non_contiguous_inputs_equal_contiguous_world_one():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 12, 8, generator=gen).transpose(1, 2)
    k = torch.randn(1, 24, 2, 8, generator=gen)[:, 1::2]
    v = torch.randn(1, 12, 2, 8, generator=gen)
    for layout in ("contiguous", "zigzag", "striped"):
        got = ring_attention(q, k, v, causal=True, layout=layout)
        expected = ring_attention(q.contiguous(), k.contiguous(), v, causal=True, layout=layout)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- shard, gather, positions

X = torch.zeros(1, 12, 2)


@pytest.mark.parametrize("call,exc,message", [
    (lambda: shard(X, "zigzag", 0, 2, dim=5), ValueError, r"dim must be an int in \[-3, 3\) for x of shape \(1, 12, 2\); got 5"),
    (lambda: shard(X, "zigzag", 0, 2, dim="1"), ValueError, r"dim must be an int in \[-3, 3\).*got '1'"),
    (lambda: shard(X, "zigzag", 0, 2, dim=1.0), ValueError, r"dim must be an int.*got 1.0"),
    (lambda: shard(torch.tensor(1.0), "zigzag", 0, 1), ValueError, "x must have a sequence dimension; got a 0-d"),
    (lambda: shard(X, None, 0, 2), ValueError, r"layout must be one of \('contiguous', 'zigzag', 'striped', 'balanced'\); got None"),
    (lambda: shard(X, "zigzag", True, 2), ValueError, r"rank must be an int in \[0, 2\); got True"),
    (lambda: shard(X, "zigzag", -1, 2), ValueError, r"rank must be an int in \[0, 2\); got -1"),
    (lambda: shard(X, "zigzag", 0, 2.0), ValueError, "world_size must be an int >= 1; got 2.0"),
    (lambda: shard([0] * 12, "zigzag", 0, 2), TypeError, "x must be a torch.Tensor; got list"),
    (lambda: gather(X, "zigzag", dim=7), ValueError, r"dim must be an int in \[-3, 3\) for x_local"),
    (lambda: gather(X, "zigzag", dim=-4), ValueError, r"dim must be an int in \[-3, 3\).*got -4"),
    (lambda: gather(torch.tensor(1.0), "zigzag"), ValueError, "x_local must have a sequence dimension"),
    (lambda: gather(X, "zz"), ValueError, "layout must be one of"),
    (lambda: gather(X.tolist(), "zigzag"), TypeError, "x_local must be a torch.Tensor; got list"),
    (lambda: gather(X, "zigzag", group=object()), ValueError, "group was given but torch.distributed is not initialised"),
    (lambda: global_positions("zigzag", 3, 2, 4), ValueError, r"rank must be an int in \[0, 2\); got 3"),
    (lambda: global_positions("zigzag", 0, 0, 4), ValueError, "world_size must be an int >= 1; got 0"),
    (lambda: global_positions("contiguous", 0, 2, -3), ValueError, "local_len must be an int >= 0"),
    (lambda: global_positions("contiguous", 0, 2), ValueError, r"local_len must be an int >= 0 \(or pass cu_seqlens\); got None"),
    (lambda: global_positions("zz", 0, 2, 4), ValueError, "layout must be one of"),
    (lambda: global_positions("zigzag", 0, 2, 3), ValueError, "local sequence length must be even"),
    (lambda: usp_shard(X, "zz", 0, 1, 0, 2), ValueError, "layout must be one of"),
    (lambda: usp_shard(X, "zigzag", 0, 5, 0, 2), ValueError, r"sequence length \(12\) must be a multiple of 20"),
    (lambda: sequence_parallel_groups(1, 1, data_parallel=0), ValueError, "data_parallel must be an int >= 1; got 0"),
    (lambda: sequence_parallel_groups(1.5, 1), ValueError, "ulysses_degree must be an int >= 1; got 1.5"),
    (lambda: sequence_parallel_groups(1, "2"), ValueError, "ring_degree must be an int >= 1; got '2'"),
], ids=lambda x: "" if callable(x) else None)
def test_layout_and_group_argument_errors(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_shard_and_gather_accept_negative_dims():
    x = torch.arange(24.0).reshape(1, 12, 2)
    assert torch.equal(shard(x, "zigzag", 0, 1, dim=-2), shard(x, "zigzag", 0, 1, dim=1))
    assert torch.equal(gather(x, "zigzag", dim=-2), x)


@pytest.mark.parametrize("args", [(0, 0, 0, 2), (5, 2, 0, 2)], ids=["ulysses_size_0", "ulysses_rank_5"])
def test_usp_shard_bad_ulysses_coordinates(args):
    with pytest.raises(ValueError, match="ulysses_(rank|size)"):
        usp_shard(X, "zigzag", *args)


def test_usp_gather_bad_layout():
    with pytest.raises(ValueError, match="layout must be one of"):
        usp_gather(X, "zz")


def test_seq_to_heads_without_group_is_identity():
    assert seq_to_heads(Q, None) is Q and heads_to_seq(Q, None) is Q


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=torch.zeros(1, 8, 0, 16)), r"nheads_kv"),
    (dict(q_positions=torch.arange(5)), r"q_positions"),
], ids=["nheads_kv_0", "q_positions_length"])
def test_attention_reference_bad_arguments(kwargs, message):
    args = dict(q=Q, k=KV, v=KV)
    args.update(kwargs)
    if "k" in kwargs:
        args["v"] = kwargs["k"]
    with pytest.raises(ValueError, match=message):
        attention_reference(**args)


# ---------------------------------------------------------------------------- a real world of two

def world_of_two(rank, world_size):
    """Edge cases that need peers; returns a dict of findings per rank (compared by the tests)."""
    import torch.distributed as dist

    found = {}
    # zero-length shards, every layout, dense
    for layout in ("contiguous", "zigzag", "striped"):
        q = torch.randn(2, 0, 4, 8, requires_grad=True)
        k, v = (torch.randn(2, 0, 2, 8, requires_grad=True) for _ in range(2))
        out = ring_attention(q, k, v, causal=True, layout=layout)
        out.sum().backward()
        found[f"zero-{layout}"] = (tuple(out.shape), tuple(q.grad.shape), tuple(k.grad.shape))
    # packed: every sequence empty; and lengths 0 and 1 mixed
    for lengths in ((0, 0), (0, 1, 0, 1)):
        cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
        full = torch.arange(sum(lengths) * 2 * 8, dtype=torch.float32).reshape(sum(lengths), 2, 8)
        local = shard(full, "zigzag", rank, world_size, cu_seqlens=cu_seqlens).requires_grad_()
        out = ring_attention(local, local, local, causal=True, layout="zigzag", cu_seqlens=cu_seqlens)
        out.sum().backward()
        gathered = gather(out.detach(), "zigzag", cu_seqlens=cu_seqlens)
        found[f"packed-{lengths}"] = torch.equal(gathered, full)  # one token attending to itself: out = v
    # non-contiguous local inputs give bit-identical results
    gen = torch.Generator().manual_seed(rank)
    q = torch.randn(1, 4, 12, 8, generator=gen).transpose(1, 2)
    k = torch.randn(1, 24, 2, 8, generator=gen)[:, ::2]
    v = torch.randn(1, 12, 1, 8, generator=gen).expand(1, 12, 2, 8)
    difference = ring_attention(q, k, v, causal=True) - ring_attention(q.contiguous(), k.contiguous(),
                                                                       v.contiguous(), causal=True)
    found["non-contiguous"] = difference.abs().max().item() <= 1e-6
    # NaN in one query row of rank 1 stays in that row
    gen = torch.Generator().manual_seed(7)
    full_q, full_k, full_v = (torch.randn(1, 16, 2, 8, generator=gen) for _ in range(3))
    full_q[0, 13, 1, 2] = math.nan
    local = [shard(x, "zigzag", rank, world_size) for x in (full_q, full_k, full_v)]
    out = gather(ring_attention(*local, causal=True, layout="zigzag"), "zigzag")
    found["nan-rows"] = sorted(_rows_nonfinite(out))
    # bad dim to gather raises before the collective, on every rank
    try:
        gather(torch.zeros(1, 4, 2), "zigzag", dim=3)
        found["gather-dim"] = "no error"
    except ValueError as error:
        found["gather-dim"] = str(error)
    # heads that do not split over the group
    group = dist.new_group([0, 1])
    try:
        seq_to_heads(torch.zeros(1, 4, 3, 8), group)
        found["seq_to_heads"] = "no error"
    except Exception as error:  # noqa: BLE001 - the message is what is checked
        found["seq_to_heads"] = f"{type(error).__name__}: {error}"
    return found


@functools.lru_cache(maxsize=None)
def world_findings():
    return run_world(2, world_of_two, timeout=180)


def test_ring_zero_length_shards_world_two():
    for found in world_findings():
        for layout in ("contiguous", "zigzag", "striped"):
            assert found[f"zero-{layout}"] == ((2, 0, 4, 8), (2, 0, 4, 8), (2, 0, 2, 8))
        assert found["packed-(0, 0)"] and found["packed-(0, 1, 0, 1)"]


def test_ring_non_contiguous_and_nan_world_two():
    for found in world_findings():
        assert found["non-contiguous"]
        assert found["nan-rows"] == [(0, 13, 1)]


def test_gather_bad_dim_world_two():
    for found in world_findings():
        assert "dim must be an int in [-3, 3)" in found["gather-dim"], found["gather-dim"]


def test_seq_to_heads_indivisible_heads_world_two():
    for found in world_findings():
        assert "nheads (3) must be divisible by" in found["seq_to_heads"], found["seq_to_heads"]


def test_ring_attention_flags_must_be_bools_and_names():
    with pytest.raises(TypeError, match=r"check_peers must be a bool; got str"):
        ring_attention(Q, KV, KV, check_peers="no")
    with pytest.raises(ValueError, match=r"topology must be one of"):
        ring_attention(Q, KV, KV, topology="torus")


def test_attention_reference_checks_causal_and_scale():
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        attention_reference(Q, KV, KV, causal="yes")
    with pytest.raises(ValueError, match=r"softmax_scale must be a positive finite number"):
        attention_reference(Q, KV, KV, softmax_scale=-1.0)
