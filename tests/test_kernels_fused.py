"""The ring-step fusions of the kernels and their two load paths.

- ``accumulate=``: the forward merges its block into float32 (out, lse) accumulators (the online-softmax
  rule of ``dist_attn.kernels.merge``) and the backward adds into float32 (dq, dk, dv), both backends, batched and
  packed: equal to a separate merge / add, bit-identical where the order of operations is unchanged.
- TMA tensor descriptors vs pointer loads: the same numbers, and the launcher picks TMA only for inputs
  TMA can read (unit last stride, 16-byte aligned base and strides).

The Triton backend runs on CUDA when present, else under Triton's interpreter (set in conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from attention_checks import max_error
from conftest import DEVICE
from dist_attn.kernels import (flash_attn_backward, flash_attn_forward, flash_attn_varlen_backward,
                     flash_attn_varlen_forward)
from dist_attn.kernels import triton_attention as ta
from dist_attn.kernels.merge import merge_

BACKENDS = ["torch", "triton"]


def device_for(backend):
    return DEVICE if backend == "triton" else torch.device("cpu")


def inputs(backend, dtype=torch.float32, seqlen_q=70, seqlen_k=90, headdim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen_q, 4, headdim, generator=gen)
    k, v = (torch.randn(2, seqlen_k, 2, headdim, generator=gen) for _ in range(2))
    dout = torch.randn(2, seqlen_q, 4, headdim, generator=gen)
    return tuple(t.to(device_for(backend), dtype) for t in (q, k, v, dout))


def fresh_accumulators(q):
    return (torch.zeros(q.shape, device=q.device),
            torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device))


# key blocks at global positions: (start, end) rows of k; queries sit at 20..89, causal
SPLITS = {"two": [(0, 40), (40, 90)], "three-uneven": [(0, 7), (7, 64), (64, 90)],
          "masked-block-first": [(85, 90), (0, 85)]}  # keys 85.. are seen by few rows only


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_forward_accumulate_equals_one_call(backend, split):
    q, k, v, _ = inputs(backend)
    out, lse = flash_attn_forward(q, k, v, None, True, q_offset=20, backend=backend)
    acc = fresh_accumulators(q)
    for start, end in split:
        result = flash_attn_forward(q, k[:, start:end], v[:, start:end], None, True, q_offset=20, k_offset=start,
                                    backend=backend, accumulate=acc)
        assert result[0] is acc[0] and result[1] is acc[1], "accumulate must return its own accumulators"
    assert not torch.isnan(acc[0]).any() and not torch.isnan(acc[1]).any()
    assert max_error(acc[0], out) <= 2e-6 and max_error(acc[1], lse) <= 2e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_accumulate_matches_merge_and_keeps_masked_rows(backend):
    """Rows no block reaches stay 0 / -inf; a block seen by some rows merges as merge_ does."""
    q, k, v, _ = inputs(backend)
    # queries at 0..69, keys of the block at 60..89: rows 0..59 see nothing (causal)
    acc = fresh_accumulators(q)
    flash_attn_forward(q, k[:, 60:], v[:, 60:], None, True, k_offset=60, backend=backend, accumulate=acc)
    assert torch.all(acc[0][:, :60] == 0) and torch.all(torch.isneginf(acc[1][:, :, :60]))
    assert not torch.isnan(acc[0]).any()
    # a second block merged in place equals merge_ of the two separate results
    first = tuple(t.clone() for t in acc)
    block = flash_attn_forward(q, k[:, :60], v[:, :60], None, True, backend=backend, out_dtype=torch.float32)
    merged = tuple(t.clone() for t in first)
    merge_(*merged, *block)
    flash_attn_forward(q, k[:, :60], v[:, :60], None, True, backend=backend, accumulate=acc)
    assert max_error(acc[0], merged[0]) <= 1e-6 and max_error(acc[1], merged[1]) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_accumulate_of_an_invisible_block_changes_nothing(backend):
    q, k, v, _ = inputs(backend)
    acc = fresh_accumulators(q)
    flash_attn_forward(q, k, v, None, True, backend=backend, accumulate=acc)
    before = tuple(t.clone() for t in acc)
    # keys far in the future: causal hides them from every query
    flash_attn_forward(q, k, v, None, True, k_offset=1000, backend=backend, accumulate=acc)
    assert torch.equal(acc[0], before[0]) and torch.equal(acc[1], before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_accumulate_is_bit_identical_to_adding(backend):
    """The kernels add ``old + block`` in their epilogue: the same float32 sum as ``total += block``.
    (On a GPU the compiler may fuse the softmax-scale multiply into that add: an FMA, one rounding fewer.)"""
    q, k, v, dout = inputs(backend)
    out, lse = flash_attn_forward(q, k, v, None, True, q_offset=20, backend=backend)
    added = [torch.zeros(t.shape, device=t.device) for t in (q, k, v)]
    fused = [torch.zeros(t.shape, device=t.device) for t in (q, k, v)]
    for start, end in SPLITS["three-uneven"]:
        args = (dout, q, k[:, start:end], v[:, start:end], out, lse, None, True)
        parts = flash_attn_backward(*args, q_offset=20, k_offset=start, backend=backend)
        added[0] += parts[0]
        added[1][:, start:end] += parts[1]
        added[2][:, start:end] += parts[2]
        flash_attn_backward(*args, q_offset=20, k_offset=start, backend=backend,
                            accumulate=(fused[0], fused[1][:, start:end], fused[2][:, start:end]))
    for name, a, b in zip(("dq", "dk", "dv"), added, fused):
        assert torch.equal(a, b), f"{name}: fused accumulation differs by {max_error(a, b)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_accumulate(backend):
    """Packed: two sequences, keys split in two blocks per sequence, merged/added in place."""
    device = device_for(backend)
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(50, 4, 32, generator=gen).to(device) if i in (0, 3) else
                     torch.randn(50, 2, 32, generator=gen).to(device) for i in range(4))
    spans = [(0, 20, 0), (20, 30, 0)]
    out, lse = flash_attn_varlen_forward(q, k, v, None, True, spans, spans, backend=backend)
    grads = flash_attn_varlen_backward(dout, q, k, v, out, lse, None, True, spans, spans, backend=backend)
    acc = (torch.zeros(q.shape, device=device), torch.full((4, 50), float("-inf"), device=device))
    acc_grads = tuple(torch.zeros(t.shape, device=device) for t in (q, k, v))
    # block A: keys 0..9 of sequence 0 and 0..14 of sequence 1; block B: the rest
    for k_spans in ([(0, 10, 0), (20, 15, 0)], [(10, 10, 10), (35, 15, 15)]):
        flash_attn_varlen_forward(q, k, v, None, True, spans, k_spans, backend=backend, accumulate=acc)
        flash_attn_varlen_backward(dout, q, k, v, out, lse, None, True, spans, k_spans, backend=backend,
                                   accumulate=acc_grads)
    assert max_error(acc[0], out) <= 2e-6 and max_error(acc[1], lse) <= 2e-6
    for name, a, b in zip(("dq", "dk", "dv"), acc_grads, grads):
        assert max_error(a, b) <= 2e-6, name


@pytest.mark.parametrize("accumulate,exc,message", [
    ("acc", TypeError, "accumulate must be None or a tuple (out, lse)"),
    ((torch.zeros(2, 70, 4, 32),), TypeError, "accumulate must be None or a tuple (out, lse)"),
    ((torch.zeros(2, 70, 4, 32, dtype=torch.float64), torch.zeros(2, 4, 70)), TypeError,
     "accumulate out.dtype must be torch.float32"),
    ((torch.zeros(2, 70, 4, 32), torch.zeros(2, 70, 4)), ValueError, "accumulate lse must have shape (2, 4, 70)"),
])
def test_bad_accumulate_errors(accumulate, exc, message):
    q, k, v, _ = inputs("torch")
    with pytest.raises(exc, match=message.replace("(", r"\(").replace(")", r"\)")):
        flash_attn_forward(q, k, v, None, True, accumulate=accumulate)


def test_bad_backward_accumulate_errors():
    q, k, v, dout = inputs("torch")
    out, lse = flash_attn_forward(q, k, v, None, True)
    bad = (torch.zeros(q.shape), torch.zeros(q.shape), torch.zeros(v.shape))  # dk shaped like q
    with pytest.raises(ValueError, match=r"accumulate dk must have shape \(2, 90, 2, 32\)"):
        flash_attn_backward(dout, q, k, v, out, lse, None, True, accumulate=bad)


# ------------------------------------------------------------------------------------- TMA vs pointers

def _run_triton(q, k, v, dout, **positions):
    out, lse = flash_attn_forward(q, k, v, None, True, backend="triton", **positions)
    return (out, lse, *flash_attn_backward(dout, q, k, v, out, lse, None, True, backend="triton", **positions))


@pytest.mark.skipif(not ta.TMA_SUPPORTED, reason="this Triton has no tensor descriptors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("headdim", [32, 48])
def test_tma_and_pointer_paths_agree(monkeypatch, dtype, headdim):
    q, k, v, dout = inputs("triton", dtype, seqlen_q=70, seqlen_k=97, headdim=headdim)
    monkeypatch.setattr(ta, "USE_TMA", True)
    assert ta._tma_ok(k, v) and ta._tma_ok(q, dout)
    with_tma = _run_triton(q, k, v, dout, q_offset=30)
    monkeypatch.setattr(ta, "USE_TMA", False)
    without = _run_triton(q, k, v, dout, q_offset=30)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), with_tma, without):
        # same tiles, same order of operations: only the load instructions differ
        assert torch.equal(a, b), f"{name} differs by {max_error(a, b)}"


@pytest.mark.skipif(not ta.TMA_SUPPORTED, reason="this Triton has no tensor descriptors")
def test_tma_only_for_inputs_it_can_read(monkeypatch):
    monkeypatch.setattr(ta, "USE_TMA", True)
    device = device_for("triton")
    base = torch.randn(2, 64, 4, 32, device=device)
    assert ta._tma_ok(base)
    assert not ta._tma_ok(base.transpose(-1, -2)), "head dim not contiguous"
    assert not ta._tma_ok(torch.randn(2, 64, 4, 59, device=device)), "rows of 236 bytes: not 16-byte aligned"
    assert not ta._tma_ok(torch.randn(2 * 64 * 4 * 32 + 1, device=device)[1:].view(2, 64, 4, 32)), \
        "base pointer 4 bytes past an aligned address"
    assert ta._tma_ok(base[:1]), "the batch stride of a dim of size 1 is never used"
    monkeypatch.setattr(ta, "USE_TMA", False)  # DIST_ATTN_TMA=0
    assert not ta._tma_ok(base)


# ------------------------------------------------------------------------- the FULL (single-loop) variant

FULL_CALLS = {  # (causal, q_offset, seqlen_k): every key visible from every query, seqlen_k % 128 == 0
    "non-causal": (False, 0, 128),
    "causal-off-diagonal": (True, 256, 256),  # queries 256.., keys 0..255: a ring step below the diagonal
}


@pytest.mark.parametrize("call", FULL_CALLS.values(), ids=FULL_CALLS.keys())
def test_full_variant_equals_the_banded_loops(monkeypatch, call):
    causal, q_offset, seqlen_k = call
    q, k, v, _ = inputs("triton", seqlen_q=70, seqlen_k=seqlen_k)
    chosen = []
    original = ta._all_visible
    monkeypatch.setattr(ta, "_all_visible", lambda *a: chosen.append(original(*a)) or chosen[-1])
    full = flash_attn_forward(q, k, v, None, causal, q_offset=q_offset, backend="triton")
    assert chosen == [True], "the launcher must pick the FULL variant for a fully visible call"
    monkeypatch.setattr(ta, "_all_visible", lambda *a: False)
    banded = flash_attn_forward(q, k, v, None, causal, q_offset=q_offset, backend="triton")
    for name, a, b in zip(("out", "lse"), full, banded):
        assert max_error(a, b) <= 1e-6, name


@pytest.mark.parametrize("positions", [dict(causal=True, q_offset=0, seqlen_k=128),     # diagonal: masked
                                       dict(causal=False, q_offset=0, seqlen_k=100)])  # partial last tile
def test_full_variant_not_taken_when_some_tile_needs_a_mask(monkeypatch, positions):
    q, k, v, _ = inputs("triton", seqlen_q=70, seqlen_k=positions["seqlen_k"])
    chosen = []
    original = ta._all_visible
    monkeypatch.setattr(ta, "_all_visible", lambda *a: chosen.append(original(*a)) or chosen[-1])
    flash_attn_forward(q, k, v, None, positions["causal"], q_offset=positions["q_offset"], backend="triton")
    assert chosen == [False]


def test_autotune_pruning_keeps_each_config_to_the_code_it_was_checked_for():
    """_TMA_ONLY tiles only with TMA (without it they spill in their main loops, benchmarks/kernel_static.py);
    float32 gets the IEEE config."""
    import triton
    plain = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    tma_only = triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2)
    assert (128, 128, 8, 2) in ta._TMA_ONLY
    configs = [plain, tma_only]

    def kept(**meta):
        defaults = dict(PRECISION="tf32", BLOCK_DQK=128, BLOCK_DV=128, TMA=True)
        return ta._prune_configs(configs, {}, **dict(defaults, **meta))

    assert kept() == configs
    assert kept(TMA=False) == [plain]
    assert kept(PRECISION="ieee") == [ta._IEEE_CONFIG]
