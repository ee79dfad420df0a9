"""The single-device kernel against the float64 reference: both backends, every mask and layout.

The Triton backend runs on CUDA when present, else under Triton's interpreter (set in conftest.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import triton
import triton.language as tl

from attention_checks import attention_lowp, max_error, reference_with_grads
from conftest import DEVICE
from dist_attn.kernels import attention_reference, flash_attn_backward, flash_attn_forward, flash_attn_func
from dist_attn.kernels.triton_attention import _band_tiles

FWD_TOL = 2e-5  # fp32 max abs error vs float64 (docs/design.md)
GRAD_TOL = 1e-4
BACKENDS = ["torch", "triton"]


def device_for(backend):
    return DEVICE if backend == "triton" else torch.device("cpu")


def run_fp32_case(backend, batch=1, seqlen_q=64, seqlen_k=64, nheads=2, nheads_kv=2, headdim=32, causal=False,
                  window=None, q_offset=0, k_offset=0, q_stride=1, k_stride=1, seed=0, headdim_v=None, softcap=None):
    """Runs forward + backward at the given positions and asserts every output against float64."""
    gen = torch.Generator().manual_seed(seed)
    device = device_for(backend)
    headdim_v = headdim if headdim_v is None else headdim_v
    q = torch.randn(batch, seqlen_q, nheads, headdim, generator=gen).to(device)
    k = torch.randn(batch, seqlen_k, nheads_kv, headdim, generator=gen).to(device)
    v = torch.randn(batch, seqlen_k, nheads_kv, headdim_v, generator=gen).to(device)
    dout = torch.randn(batch, seqlen_q, nheads, headdim_v, generator=gen).to(device)
    positions = dict(q_offset=q_offset, k_offset=k_offset, q_stride=q_stride, k_stride=k_stride, window=window,
                     softcap=softcap)
    out, lse = flash_attn_forward(q, k, v, None, causal, backend=backend, **positions)
    dq, dk, dv = flash_attn_backward(dout, q, k, v, out, lse, None, causal, backend=backend, **positions)

    q_pos = q_offset + q_stride * torch.arange(seqlen_q)
    k_pos = k_offset + k_stride * torch.arange(seqlen_k)
    ref_out, ref_lse, ref_dq, ref_dk, ref_dv = reference_with_grads(
        q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal, window, q_pos, k_pos, softcap=softcap)
    out, lse, dq, dk, dv = (t.cpu() for t in (out, lse, dq, dk, dv))

    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"NaN in {name}"
    assert lse.dtype == torch.float32 and dq.dtype == dk.dtype == dv.dtype == torch.float32
    masked_rows = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), masked_rows), "lse must be -inf exactly on rows that see no key"
    assert torch.all(out.transpose(1, 2)[masked_rows] == 0), "rows that see no key must output 0"
    lse_err = max_error(lse[~masked_rows], ref_lse[~masked_rows])
    errors = {"out": max_error(out, ref_out), "lse": lse_err}
    assert max(errors.values()) <= FWD_TOL, f"forward error {errors} > {FWD_TOL}"
    grad_errors = {"dq": max_error(dq, ref_dq), "dk": max_error(dk, ref_dk), "dv": max_error(dv, ref_dv)}
    assert max(grad_errors.values()) <= GRAD_TOL, f"gradient error {grad_errors} > {GRAD_TOL}"
    return masked_rows


SHAPES = {
    "len1": dict(seqlen_q=1, seqlen_k=1),
    "len17_causal": dict(seqlen_q=17, seqlen_k=17, causal=True),
    "len127x128_gqa": dict(seqlen_q=127, seqlen_k=128, nheads=4, nheads_kv=2),
    "len128_batch2": dict(batch=2, seqlen_q=128, seqlen_k=128, causal=True),
    "len129_mqa_causal": dict(seqlen_q=129, seqlen_k=129, nheads=4, nheads_kv=1, causal=True),
    "len1000_causal": dict(seqlen_q=1000, seqlen_k=1000, nheads=1, nheads_kv=1, causal=True),
    "q_shorter": dict(seqlen_q=50, seqlen_k=130, causal=True),
    "q_longer": dict(seqlen_q=130, seqlen_k=50, nheads=3, nheads_kv=1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_lengths_and_heads(backend, shape):
    run_fp32_case(backend, **shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("headdim", [32, 59, 64, 96, 128, 256])
def test_head_dims(backend, headdim):
    run_fp32_case(backend, seqlen_q=70, seqlen_k=70, headdim=headdim, causal=True)


WINDOWS = [(16, 0), (8, 8), (None, 5), (5, None), (0, 0), (40, 40)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_windows(backend, causal, window):
    run_fp32_case(backend, seqlen_q=150, seqlen_k=150, causal=causal, window=window)


POSITIONS = {
    # striped layout, world 4: queries on rank 1, keys on rank 3
    "striped": dict(q_offset=1, q_stride=4, k_offset=3, k_stride=4, causal=True),
    # zigzag: the late query half against an early key chunk, entirely visible
    "late_queries": dict(q_offset=300, k_offset=0, causal=True),
    # the first 40 query rows see no key
    "partly_masked": dict(q_offset=0, k_offset=40, causal=True),
    "strided_window": dict(q_offset=5, q_stride=3, k_offset=2, k_stride=2, window=(20, 10)),
    "negative_offset": dict(q_offset=-30, k_offset=-50, q_stride=2, causal=True, window=(33, None)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", POSITIONS.values(), ids=POSITIONS.keys())
def test_offsets_and_strides(backend, positions):
    run_fp32_case(backend, seqlen_q=100, seqlen_k=90, **positions)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", [
    dict(q_offset=0, k_offset=200, causal=True),           # every key is in the future
    dict(q_offset=0, q_stride=2, k_offset=1, k_stride=2, window=(0, 0)),  # no key at any query position
], ids=["future_keys", "disjoint_positions"])
def test_fully_masked_block(backend, positions):
    masked_rows = run_fp32_case(backend, seqlen_q=40, seqlen_k=40, **positions)
    assert masked_rows.all()


def test_partly_masked_rows_are_the_expected_ones():
    masked_rows = run_fp32_case("torch", seqlen_q=100, seqlen_k=90, q_offset=0, k_offset=40, causal=True)
    assert masked_rows[0, 0, :40].all() and not masked_rows[0, 0, 40:].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 80, 32, generator=gen).to(device).transpose(1, 2)     # heads-major storage
    kv = torch.randn(1, 80, 2, 1, 64, generator=gen).to(device)                  # packed k and v
    k, v = kv[:, :, 0, :, ::2], kv[:, :, 1, :, 1::2]                             # headdim stride 2
    dout = torch.randn(1, 2, 80, 32, generator=gen).to(device).transpose(1, 2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    out, lse = flash_attn_forward(q, k, v, None, True, backend=backend)
    grads = flash_attn_backward(dout, q, k, v, out, lse, None, True, backend=backend)
    contiguous = [x.contiguous() for x in (q, k, v)]
    out_c, lse_c = flash_attn_forward(*contiguous, None, True, backend=backend)
    grads_c = flash_attn_backward(dout.contiguous(), *contiguous, out_c, lse_c, None, True, backend=backend)
    torch.testing.assert_close(out, out_c, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse, lse_c, rtol=0, atol=1e-6)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g, g_c, rtol=0, atol=1e-6)
    ref_out, ref_lse = attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    assert max_error(out.cpu(), ref_out) <= FWD_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_scale(backend, causal):
    device = device_for(backend)
    q, k, v = (torch.randn(1, 33, 2, 16).to(device) for _ in range(3))
    out, lse = flash_attn_forward(q, k, v, 0.3, causal, backend=backend)
    ref_out, ref_lse = attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=causal,
                                           softmax_scale=0.3)
    assert max(max_error(out.cpu(), ref_out), max_error(lse.cpu(), ref_lse)) <= FWD_TOL


# ------------------------------------------------------------------------ low precision: the 2x rule

LOWP_CASES = {
    "causal_gqa": dict(seqlen=128, nheads=4, nheads_kv=2, headdim=64, causal=True, window=None),
    "noncausal_odd": dict(seqlen=97, nheads=2, nheads_kv=2, headdim=32, causal=False, window=None),
    "window": dict(seqlen=128, nheads=2, nheads_kv=1, headdim=64, causal=False, window=(24, 24)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", LOWP_CASES.values(), ids=LOWP_CASES.keys())
def test_low_precision_within_2x_of_pytorch(backend, dtype, case):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(2)
    shape_q = (1, case["seqlen"], case["nheads"], case["headdim"])
    shape_kv = (1, case["seqlen"], case["nheads_kv"], case["headdim"])
    q, k, v = (torch.randn(s, generator=gen).to(device, dtype).requires_grad_() for s in (shape_q, shape_kv, shape_kv))
    dout = torch.randn(shape_q, generator=gen).to(device, dtype)
    causal, window = case["causal"], case["window"]

    out = flash_attn_func(q, k, v, causal=causal, window=window, backend=backend)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_pt = attention_lowp(q, k, v, causal=causal, window=window)
    grads_pt = torch.autograd.grad(out_pt, (q, k, v), dout)
    ref_out, _, *ref_grads = reference_with_grads(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), causal, window)

    report = {}
    for name, ours, plain, ref in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_pt, *grads_pt),
                                      (ref_out, *ref_grads)):
        ours_err, plain_err = max_error(ours.cpu(), ref), max_error(plain.cpu(), ref)
        report[name] = (ours_err, plain_err)
        assert ours_err <= 2 * plain_err, f"{name}: error {ours_err:.3g} > 2x PyTorch's {plain_err:.3g}; {report}"


# ----------------------------------------------------------------------------------- flash_attn_func

@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_func_autograd(backend):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 45, 4, 32, generator=gen).to(device).requires_grad_()
    k, v = (torch.randn(2, 60, 2, 32, generator=gen).to(device).requires_grad_() for _ in range(2))
    dout = torch.randn(2, 45, 4, 32, generator=gen).to(device)
    out, lse = flash_attn_func(q, k, v, causal=True, window=(30, None), return_lse=True, backend=backend)
    assert not lse.requires_grad and lse.shape == (2, 4, 45)
    out.backward(dout)
    ref_out, ref_lse, *ref_grads = reference_with_grads(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), True, (30, None))
    assert max_error(out.cpu(), ref_out) <= FWD_TOL and max_error(lse.cpu(), ref_lse) <= FWD_TOL
    for x, ref in zip((q, k, v), ref_grads):
        assert x.grad.dtype == x.dtype
        assert max_error(x.grad.cpu(), ref) <= GRAD_TOL


def test_default_backend_on_cpu_is_torch(monkeypatch):
    from dist_attn.kernels import torch_backend
    calls = []
    original = torch_backend.forward
    monkeypatch.setattr(torch_backend, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    flash_attn_func(*(torch.randn(1, 8, 1, 16) for _ in range(3)))
    assert calls == [1]


def test_torch_backend_memory_is_linear_in_seqlen():
    """No op of the chunked path may produce a seqlen x seqlen tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            for t in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return result

    seqlen = 2048
    q, k, v = (torch.randn(1, seqlen, 1, 16, requires_grad=True) for _ in range(3))
    with LargestTensor():
        flash_attn_func(q, k, v, backend="torch").sum().backward()
    assert LargestTensor.largest < seqlen * seqlen // 4, LargestTensor.largest


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sequences(backend):
    device = device_for(backend)
    q, k = torch.randn(1, 5, 2, 16, device=device), torch.randn(1, 0, 2, 16, device=device)
    out, lse = flash_attn_forward(q, k, k, None, False, backend=backend)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    empty_q = torch.randn(1, 0, 2, 16, device=device)
    out, lse = flash_attn_forward(empty_q, q, q, None, True, backend=backend)
    assert out.shape == (1, 0, 2, 16) and lse.shape == (1, 2, 0)


# --------------------------------------------------------------------------------- tile enumeration

def brute_force_tiles(a_first, a_stride, a_len, b_offset, b_stride, b_len, below, above, block):
    """{tile start: fully visible?} for every tile of b holding at least one visible pair."""
    a_pos = a_first + a_stride * torch.arange(a_len)
    tiles = {}
    for start in range(0, b_len, block):
        b_pos = b_offset + b_stride * torch.arange(start, min(start + block, b_len))
        diff = a_pos[:, None] - b_pos[None, :]
        visible = (diff <= below) & (diff >= -above)
        if visible.any():
            tiles[start] = bool(visible.all()) and start + block <= b_len
    return tiles


BAND_CASES = [  # a_first, a_stride, a_len, b_offset, b_stride, b_len, below, above, block
    (0, 1, 32, 0, 1, 200, 300, 0, 16),
    (100, 1, 32, 0, 1, 200, 300, 0, 16),
    (100, 1, 32, 0, 1, 200, 20, 5, 16),
    (7, 4, 16, 3, 4, 90, 1000, 0, 16),
    (-30, 2, 32, -50, 1, 77, 33, 1000, 32),
    (0, 1, 16, 500, 1, 64, 10, 0, 16),
]
# Tiles are chosen from the range [first, last] of a block's positions. That is exact unless the
# positions have gaps wider than the band (a stride larger than below + above + 1): then a tile
# between two visible stripes is visited (and fully masked). It costs work, never correctness.
GAPPY_BAND_CASE = (0, 2, 8, 1, 2, 64, 0, 0, 16)


def assert_tiles_cover_band(visited, expected, exact):
    """visited / expected: {tile start: fully visible}. Every tile with a visible pair is visited;
    no tile skips the mask wrongly; with ``exact``, nothing else is visited either."""
    assert set(expected) <= set(visited), (visited, expected)
    if exact:
        assert set(visited) == set(expected), (visited, expected)
    for tile, full in visited.items():
        assert full == expected.get(tile, False), f"tile {tile}: mask skipped={full}, but expected {expected.get(tile)}"


@pytest.mark.parametrize("case", BAND_CASES + [GAPPY_BAND_CASE])
def test_torch_backend_tiles_cover_the_band_once(case, monkeypatch):
    """The torch path's (query chunk, key chunk) tiles cover every visible pair exactly once, and a
    tile comes without a mask only when every pair in it is visible."""
    import dist_attn.kernels.torch_backend as torch_backend
    from dist_attn.kernels.positions import Positions

    a_first, a_stride, a_len, b_offset, b_stride, b_len, below, above, block = case
    monkeypatch.setattr(torch_backend, "CHUNK", block)
    a_pos = a_first + a_stride * torch.arange(a_len)
    b_pos = b_offset + b_stride * torch.arange(b_len)
    diff = a_pos[:, None] - b_pos[None, :]
    visible = (diff <= below) & (diff >= -above)
    covered = torch.zeros_like(visible, dtype=torch.int64)
    for qs, ks, mask in torch_backend._tiles(Positions(a_first, a_stride, a_len), Positions(b_offset, b_stride, b_len),
                                             below, above):
        covered[qs, ks] += 1
        if mask is None:
            assert visible[qs, ks].all(), f"tile {qs}, {ks} skips the mask but the band cuts it"
        else:
            assert torch.equal(mask, visible[qs, ks])
    assert torch.all(covered[visible] == 1), "a visible pair is missed or visited twice"
    assert covered.max() <= 1


@triton.jit
def _band_tiles_probe(Out, a_first, a_last, b_offset, b_stride, b_len, below, above, BLOCK: tl.constexpr):
    start, full_start, full_end, end = _band_tiles(a_first, a_last, b_offset, b_stride, b_len, below, above, BLOCK)
    tl.store(Out + 0, start)
    tl.store(Out + 1, full_start)
    tl.store(Out + 2, full_end)
    tl.store(Out + 3, end)


@pytest.mark.parametrize("case", BAND_CASES + [GAPPY_BAND_CASE])
def test_triton_band_tiles_are_exact(case):
    """The Triton kernels visit exactly the tiles that hold a visible pair and mask only cut ones."""
    a_first, a_stride, a_len, b_offset, b_stride, b_len, below, above, block = case
    out = torch.zeros(4, dtype=torch.int32, device=DEVICE)
    _band_tiles_probe[(1,)](out, a_first, a_first + (a_len - 1) * a_stride, b_offset, b_stride, b_len, below, above, BLOCK=block)
    start, full_start, full_end, end = out.tolist()
    visited = {}
    for lo, hi, full in ((start, full_start, False), (full_start, full_end, True), (full_end, end, False)):
        for tile in range(lo, hi, block):
            assert tile not in visited, f"tile {tile} visited twice"
            visited[tile] = full
    expected = brute_force_tiles(a_first, a_stride, a_len, b_offset, b_stride, b_len, below, above, block)
    assert_tiles_cover_band(visited, expected, exact=case != GAPPY_BAND_CASE)


# ------------------------------------------------------------------------------------------ errors

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


Q, KV = _t(1, 8, 4, 16), _t(1, 8, 2, 16)
BAD_FORWARD_CALLS = {
    "q_not_tensor": ((Q.tolist(), KV, KV), {}, TypeError, "q must be a torch.Tensor"),
    "q_3d": ((_t(8, 4, 16), KV, KV), {}, ValueError, "q must be 4-D"),
    "int_dtype": ((Q.long(), KV.long(), KV.long()), {}, TypeError, "q.dtype must be one of"),
    "float64": ((Q.double(), KV.double(), KV.double()), {}, TypeError, "q.dtype must be one of"),
    "mixed_dtypes": ((Q, KV.half(), KV.half()), {}, TypeError, "share one dtype"),
    "mixed_devices": ((Q, _t(1, 8, 2, 16, device="meta"), KV), {}, ValueError, "one device"),
    "kv_shapes": ((Q, KV, _t(1, 9, 2, 16)), {}, ValueError, r"k and v must have the same \(batch, seqlen"),
    "batch": ((Q, _t(2, 8, 2, 16), _t(2, 8, 2, 16)), {}, ValueError, "batch size"),
    "headdim_mismatch": ((Q, _t(1, 8, 2, 8), _t(1, 8, 2, 8)), {}, ValueError,
                         r"k head dim must equal q's \(headdim_qk = 16\); got 8 \(v may differ: headdim_v = 8\)"),
    "headdim_too_large": ((_t(1, 8, 4, 300), _t(1, 8, 2, 300), _t(1, 8, 2, 300)), {}, ValueError,
                          "headdim_qk must be between 1 and 256"),
    "headdim_v_too_large": ((Q, KV, _t(1, 8, 2, 300)), {}, ValueError, "headdim_v must be between 1 and 256"),
    "heads_not_divisible": ((Q, _t(1, 8, 3, 16), _t(1, 8, 3, 16)), {}, ValueError, "divisible by nheads_kv"),
    "window_negative": ((Q, KV, KV), {"window": (-1, 0)}, ValueError, "window left must be an int >= 0"),
    "window_length": ((Q, KV, KV), {"window": (1, 2, 3)}, ValueError, "pair"),
    "window_float": ((Q, KV, KV), {"window": (1.5, None)}, ValueError, "window left"),
    "scale_negative": ((Q, KV, KV), {"softmax_scale": -1.0}, ValueError, "softmax_scale must be a positive"),
    "scale_string": ((Q, KV, KV), {"softmax_scale": "big"}, TypeError, "softmax_scale must be a float"),
    "causal_string": ((Q, KV, KV), {"causal": "yes"}, TypeError, "causal must be a bool"),
    "backend": ((Q, KV, KV), {"backend": "cuda"}, ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("args,kwargs,exc,message", BAD_FORWARD_CALLS.values(), ids=BAD_FORWARD_CALLS.keys())
def test_bad_input_errors(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        flash_attn_func(*args, **kwargs)


@pytest.mark.parametrize("kwargs,exc,message", [
    ({"q_stride": 0}, ValueError, "q_stride must be an int >= 1"),
    ({"k_offset": 1.5}, TypeError, "k_offset must be an int"),
    ({"q_offset": 2**31}, ValueError, "q positions must fit in int32"),
])
def test_bad_position_errors(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        flash_attn_forward(Q, KV, KV, None, False, **kwargs)


@pytest.mark.parametrize("which,value,exc,message", [
    ("dout", _t(1, 8, 4, 8), ValueError, r"dout must have shape \(1, 8, 4, 16\)"),
    ("out", _t(1, 7, 4, 16), ValueError, "out must have shape"),
    ("lse", _t(1, 8, 4), ValueError, r"lse must have shape \(1, 4, 8\)"),
    ("lse", _t(1, 4, 8, dtype=torch.float64), TypeError, "lse.dtype must be torch.float32"),
])
def test_bad_backward_errors(which, value, exc, message):
    args = {"dout": Q, "out": Q, "lse": _t(1, 4, 8)}
    args[which] = value
    with pytest.raises(exc, match=message):
        flash_attn_backward(args["dout"], Q, KV, KV, args["out"], args["lse"], None, False)


def test_triton_on_cpu_without_interpreter_is_an_error(monkeypatch):
    from dist_attn.kernels import triton_attention
    monkeypatch.setattr(triton_attention, "INTERPRET", False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        flash_attn_func(Q, KV, KV, backend="triton")


# ------------------------------------------------------------------------------------------ GPU only

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_large_low_precision(dtype, causal):
    """Realistic sizes on CUDA: hd128, 2K tokens, GQA; the 2x rule against PyTorch's own precision."""
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 2048, 8, 128, generator=gen).cuda().to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2048, 2, 128, generator=gen).cuda().to(dtype).requires_grad_() for _ in range(2))
    dout = torch.randn(2, 2048, 8, 128, generator=gen).cuda().to(dtype)
    out = flash_attn_func(q, k, v, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    out_pt = attention_lowp(q, k, v, causal=causal)
    grads_pt = torch.autograd.grad(out_pt, (q, k, v), dout)
    qf, kf, vf = (x.detach().float().requires_grad_() for x in (q, k, v))
    ref = attention_lowp(qf, kf, vf, causal=causal)  # fp32 on GPU; float64 would be too slow here
    ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dout.float())
    for name, ours, plain, exact in zip(("out", "dq", "dk", "dv"), (out, *grads), (out_pt, *grads_pt), (ref, *ref_grads)):
        ours_err, plain_err = max_error(ours, exact), max_error(plain, exact)
        assert math.isfinite(ours_err) and ours_err <= 2 * plain_err, f"{name}: {ours_err:.3g} vs {plain_err:.3g}"
