"""Memory of the kernel and the ring on CPU: no growth over repeated calls, and an O(local sequence) peak.

How CPU tensor memory is measured: ``torch.profiler`` with ``profile_memory=True`` records every
allocation and free of PyTorch's CPU allocator as a ``[memory]`` event with a signed byte count. The
running sum of those events, in time order, is the tensor memory allocated since tracing began: its
final value is the net growth and its maximum the peak (``allocation_trace``). That counts exactly the
bytes of tensors (no allocator caching on CPU, nothing from other processes or from Python objects),
so the thresholds below can be tight. The process RSS would be the alternative, but glibc keeps freed
pages, other threads and the profiler itself move it, and neighbours on a shared box make it noisy:
a leak of a few kilobytes per call would be invisible under any safe threshold.

The ring's peak (``ring_peak_terms``), per rank, for a forward + backward with the chunked torch backend, on a
rank holding ``L`` tokens of ``B`` sequences with ``H`` query heads, ``Hk`` K/V heads, head dim ``D``, element
size ``e`` (2 for bf16, 4 for fp32), ``S = B*L*H*D`` and ``Skv = B*L*Hk*D`` elements. The peak is in the backward,
while a tile's gradients are computed; the tensors alive then, in bytes:

    inputs      e * (2 S + 2 Skv)     q, k, v and dout (here made before tracing starts: not in the measured peak)
    out         e * S                 the saved output (for fp32 the forward's accumulator itself)
    lse         4 * B * H * L
    dq          4 * S                 float32 accumulator
    dkv         3 * 4 * 2 Skv         float32 dK/dV: the visiting block's, the previous one in flight, the incoming
    kv          2 * e * 2 Skv         the K/V message held and the one arriving
    tiles       2 * 4 * B * H * r * c P and dS of one tile (r query rows, c = min(256, key segment) keys)
    chunks      4 * B * (2 H r + [e != 4] 2 Hk c) * D   float32 copies of the query chunk of q and dout, and of
                                      the key tile of k and v (fp32 inputs need no copy of those)

with r = min(query segment, the rows that keep a tile under TILE_BYTES). The float32 accumulators (dq and dkv)
are the part a bf16 ring could halve. Measured on CPU, world 2 (the same on every rank, and for worlds 4 and 8),
the sum of the terms matches to within 32 KiB (the rest: row statistics, masks, delta), tested below for the
zigzag causal and contiguous non-causal rings at L=512 and 1024 (B=1, H=4, Hk=2, D=32, fp32) and for GQA 8/2
heads, head dim 64, L=512 in fp32 and bf16 (the shape of 4096 tokens over 8 ranks). Nothing is O(L^2): one
float32 (L x L) score matrix would add 3 * B * H * L^2 * 4 bytes when L doubles, and the growth check fails on it.
"""

from __future__ import annotations

import functools

import torch

from launch.spawn import run_world

WARMUP, SHORT_RUN, ITERATIONS = 3, 2, 20
LEAK_SLACK = 16 * 1024  # bytes over 20 calls; a leaked LSE (the smallest per-call tensor, 1.5 KiB) gives 30 KiB
SHAPE = dict(batch=1, nheads=4, nheads_kv=2, headdim=32)
GQA_SHAPE = dict(batch=1, nheads=8, nheads_kv=2, headdim=64)  # 4096 tokens over 8 ranks: 512 per rank
PEAK_SLACK = 32 * 1024  # bytes beyond the named terms: row statistics, masks, delta
LOCAL_LENGTHS = (512, 1024)


MARKER_BYTES = 777_777  # an allocation of this odd size marks an iteration boundary in the trace


def _memory_events(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                  key=lambda e: e.start_ns())


def allocation_trace(fn):
    """(net bytes, peak bytes) of CPU tensor memory allocated while ``fn()`` runs, relative to its start."""
    current = peak = 0
    for event in _memory_events(fn):
        current += event.nbytes()
        peak = max(peak, current)
    return current, peak


def levels_at_markers(fn):
    """Allocated bytes (relative to the start of tracing) each time ``fn`` calls ``mark()``."""
    def mark():
        torch.empty(MARKER_BYTES, dtype=torch.uint8)  # allocated and freed at once

    levels, current = [], 0
    for event in _memory_events(lambda: fn(mark)):
        if event.nbytes() == MARKER_BYTES:
            levels.append(current)
        current += event.nbytes()
    return levels


def ring_peak_terms(batch, local_len, nheads, nheads_kv, headdim, elem, q_segment, k_segment):
    """The tensors alive at the peak of the ring's forward + backward (module docstring), in bytes, by name.
    ``q_segment`` / ``k_segment``: the rows of the query and key segments a kernel call gets (zigzag: L / 2)."""
    from dist_attn.kernels.torch_backend import CHUNK, _tile_rows

    s, s_kv = batch * local_len * nheads * headdim, batch * local_len * nheads_kv * headdim
    rows, cols = min(q_segment, _tile_rows(batch, nheads)), min(k_segment, CHUNK)
    kv_copies = 0 if elem == 4 else 2 * nheads_kv * cols
    return {"inputs": elem * (2 * s + 2 * s_kv), "out": elem * s, "lse": 4 * batch * nheads * local_len,
            "dq": 4 * s, "dkv": 3 * 4 * 2 * s_kv, "kv": 2 * elem * 2 * s_kv,
            "tiles": 2 * 4 * batch * nheads * rows * cols,
            "chunks": 4 * batch * (2 * nheads * rows + kv_copies) * headdim}


def _inputs(local_len, seed=0, shape=SHAPE, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    b, h, hk, d = shape["batch"], shape["nheads"], shape["nheads_kv"], shape["headdim"]
    q = torch.randn(b, local_len, h, d, generator=gen).to(dtype).requires_grad_()
    k, v = (torch.randn(b, local_len, hk, d, generator=gen).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v, torch.randn(b, local_len, h, d, generator=gen).to(dtype)


def _growth(call, q, k, v, dout):
    """Bytes by which ITERATIONS more forward + backward calls grow memory: one traced run of
    SHORT_RUN + ITERATIONS calls (after WARMUP), levels read at marker allocations after call SHORT_RUN
    and after the last. Comparing two levels inside one trace cancels what a correct implementation
    legitimately keeps between calls (the Triton interpreter holds the last launch's buffers, and frees
    of blocks that predate tracing are not recorded). Grads come from ``torch.autograd.grad`` and are
    dropped, so nothing should accumulate."""
    def step():
        out = call(q, k, v)
        torch.autograd.grad(out, (q, k, v), dout)

    def run(mark):
        for i in range(SHORT_RUN + ITERATIONS):
            step()
            if i + 1 in (SHORT_RUN, SHORT_RUN + ITERATIONS):
                mark()

    for _ in range(WARMUP):
        step()
    before, after = levels_at_markers(run)
    return after - before


def ring_memory(rank, world_size):
    """Per rank: net growth of repeated ring calls, and the peak of one forward + backward per length."""
    from dist_attn import ring_attention

    results = {}
    q, k, v, dout = _inputs(64, seed=rank)
    for layout, causal, window in (("zigzag", True, None), ("striped", False, (5, 3))):
        results[f"growth-{layout}"] = _growth(
            lambda q, k, v: ring_attention(q, k, v, causal=causal, layout=layout, window=window), q, k, v, dout)
    cases = [(layout, causal, local_len, SHAPE, torch.float32) for layout, causal in (("zigzag", True),
             ("contiguous", False)) for local_len in LOCAL_LENGTHS]
    cases += [("zigzag", True, 512, GQA_SHAPE, dtype) for dtype in (torch.float32, torch.bfloat16)]
    for layout, causal, local_len, shape, dtype in cases:
        q, k, v, dout = _inputs(local_len, seed=rank, shape=shape, dtype=dtype)

        def step():
            out = ring_attention(q, k, v, causal=causal, layout=layout)
            torch.autograd.grad(out, (q, k, v), dout)

        step()  # warm-up (caches of the ring plan)
        results[peak_key(layout, local_len, shape, dtype)] = allocation_trace(step)[1]
    return results


def peak_key(layout, local_len, shape, dtype):
    return f"peak-{layout}-{local_len}-{shape['nheads']}-{str(dtype)[6:]}"


@functools.lru_cache(maxsize=None)
def ring_results():
    return run_world(2, ring_memory, timeout=300)


def test_kernel_memory_does_not_grow():
    """flash_attn_func (torch backend causal and window, Triton window) and flash_attn_varlen_func: 20 more calls,
    no growth."""
    from dist_attn.kernels import flash_attn_func, flash_attn_varlen_func

    both, window_only = ((True, None), (False, (7, 2))), ((False, (7, 2)),)
    for backend, seqlen, masks in (("torch", 96, both), ("triton", 40, window_only)):  # the interpreter is slow
        q, k, v, dout = _inputs(seqlen)
        for causal, window in masks:
            net = _growth(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, window=window, backend=backend),
                          q, k, v, dout)
            assert abs(net) <= LEAK_SLACK, f"{backend} causal={causal} window={window}: {net} bytes after {ITERATIONS} calls"
    q, k, v, dout = _inputs(96)
    cu_seqlens = torch.tensor([0, 10, 10, 61, 96], dtype=torch.int32)
    net = _growth(lambda q, k, v: flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, causal=True)[None], q, k, v,
                  dout)
    assert abs(net) <= LEAK_SLACK, f"varlen: {net} bytes after {ITERATIONS} calls"


def test_ring_memory_does_not_grow():
    """ring_attention forward + backward on a world of 2 (zigzag causal; striped with a window): no growth."""
    for rank, results in enumerate(ring_results()):
        for name, net in results.items():
            if name.startswith("growth"):
                assert abs(net) <= LEAK_SLACK, f"rank {rank} {name}: {net} bytes after {ITERATIONS} calls"


def test_ring_peak_memory_is_the_sum_of_its_terms():
    """Per rank, world 2: the measured peak equals the named terms of ring_peak_terms (without the inputs, made
    before tracing) to within PEAK_SLACK, for both layouts, L = 512 and 1024, and the GQA shape in fp32 and bf16."""
    cases = [(layout, n, SHAPE, torch.float32) for layout in ("zigzag", "contiguous") for n in LOCAL_LENGTHS]
    cases += [("zigzag", 512, GQA_SHAPE, dtype) for dtype in (torch.float32, torch.bfloat16)]
    for rank, results in enumerate(ring_results()):
        for layout, n, shape, dtype in cases:
            segment = n // 2 if layout == "zigzag" else n
            terms = ring_peak_terms(shape["batch"], n, shape["nheads"], shape["nheads_kv"], shape["headdim"],
                                    torch.empty(0, dtype=dtype).element_size(), segment, segment)
            expected = sum(terms.values()) - terms["inputs"]
            measured = results[peak_key(layout, n, shape, dtype)]
            assert 0 <= measured - expected <= PEAK_SLACK, (
                f"rank {rank} {layout} L={n} {shape} {dtype}: measured peak {measured}, terms {expected} {terms}")


def test_ring_peak_memory_is_linear_in_the_local_sequence():
    """Per rank, world 2, L = 512 and 1024: doubling L adds at most the sequence terms at L (no L^2 term)."""
    short, long = LOCAL_LENGTHS
    for rank, results in enumerate(ring_results()):
        for layout in ("zigzag", "contiguous"):
            peaks = {n: results[peak_key(layout, n, SHAPE, torch.float32)] for n in LOCAL_LENGTHS}
            # doubling L may add at most 8 x (S + 2 Skv) float32 bytes at L (every sequence term of
            # ring_peak_terms is below that); an L x L score matrix would add 3 x B * H * L^2 * 4 bytes (12.6 MB here)
            seq_term = 8 * SHAPE["batch"] * short * (SHAPE["nheads"] + 2 * SHAPE["nheads_kv"]) * SHAPE["headdim"] * 4
            assert peaks[long] - peaks[short] <= seq_term, (
                f"rank {rank} {layout}: peak {peaks[short]} at L={short}, {peaks[long]} at L={long}: grows faster "
                f"than linearly (allowed increase {seq_term})")
