"""Memory of the kernel and the ring on CPU: no growth over repeated calls, and an O(local sequence) peak.

How CPU tensor memory is measured: ``torch.profiler`` with ``profile_memory=True`` records every
allocation and free of PyTorch's CPU allocator as a ``[memory]`` event with a signed byte count. The
running sum of those events, in time order, is the tensor memory allocated since tracing began: its
final value is the net growth and its maximum the peak (``allocation_trace``). That counts exactly the
bytes of tensors (no allocator caching on CPU, nothing from other processes or from Python objects),
so the thresholds below can be tight. The process RSS would be the alternative, but glibc keeps freed
pages, other threads and the profiler itself move it, and neighbours on a shared box make it noisy:
a leak of a few kilobytes per call would be invisible under any safe threshold.

The peak bound (``peak_bound``), per rank, for the ring's forward + backward with the chunked torch
backend, float32, on a rank holding ``L`` tokens of ``B`` sequences with ``H`` query heads, ``Hk``
K/V heads and head dim ``D``::

    peak <= 8 * (S + 2 * Skv) + 10 * T + 1 MiB
    S   = B * L * H  * D * 4      (bytes of the local q, or out, in float32)
    Skv = B * L * Hk * D * 4      (bytes of the local k, or v)
    T   = B * H * min(L, CHUNK)**2 * 4   (one score tile; CHUNK = dist_attn.kernels.torch_backend.CHUNK = 256)

Where it comes from: at the peak of the backward a rank holds the float32 output and the dq
accumulator, the backend's dq and its ungrouped copy (4 S), K/V for the current and the next step,
the dK/dV accumulator of the visiting block, the one arriving, the backend's dk/dv and their ungrouped
copies (12 Skv = 6 x 2 Skv), and a handful of CHUNK x CHUNK tiles per head (scores, masked scores,
P, dP, dS and temporaries: <= 10 T); 8 rather than 6 leaves room for merge and cast temporaries, 1 MiB
for small buffers (LSE, masks, row statistics). Nothing is O(L^2): one float32 (L x L) score matrix of
the local block against a visiting one (B * H * L^2 * 4 bytes) adds 3 * B * H * L^2 * 4 bytes when L
doubles (12.6 MB from L = 512 to 1024 here) against an allowed increase of 8 * (S + 2 * Skv) at L = 512
(4.2 MB): the growth check fails on it (verified by injecting one).
Measured on CPU (world 2, B=1, H=4, Hk=2, D=32, both ranks): zigzag causal 7.69 MB at L=512 and
11.04 MB at L=1024; contiguous non-causal 8.68 MB and 11.06 MB; bounds 15.73 MB and 19.92 MB.
"""

from __future__ import annotations

import functools

import torch

from launch.spawn import run_world

WARMUP, SHORT_RUN, ITERATIONS = 3, 2, 20
LEAK_SLACK = 16 * 1024  # bytes over 20 calls; a leaked LSE (the smallest per-call tensor, 1.5 KiB) gives 30 KiB
SHAPE = dict(batch=1, nheads=4, nheads_kv=2, headdim=32)
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


def peak_bound(batch, local_len, nheads, nheads_kv, headdim):
    """The documented per-rank peak of the ring's forward + backward (module docstring), in bytes."""
    from dist_attn.kernels.torch_backend import CHUNK

    s = batch * local_len * nheads * headdim * 4
    s_kv = batch * local_len * nheads_kv * headdim * 4
    tile = batch * nheads * min(local_len, CHUNK) ** 2 * 4
    return 8 * (s + 2 * s_kv) + 10 * tile + 2**20


def _inputs(local_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b, h, hk, d = SHAPE["batch"], SHAPE["nheads"], SHAPE["nheads_kv"], SHAPE["headdim"]
    q = torch.randn(b, local_len, h, d, generator=gen).requires_grad_()
    k, v = (torch.randn(b, local_len, hk, d, generator=gen).requires_grad_() for _ in range(2))
    return q, k, v, torch.randn(b, local_len, h, d, generator=gen)


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
    for layout, causal in (("zigzag", True), ("contiguous", False)):
        for local_len in LOCAL_LENGTHS:
            q, k, v, dout = _inputs(local_len, seed=rank)

            def step():
                out = ring_attention(q, k, v, causal=causal, layout=layout)
                torch.autograd.grad(out, (q, k, v), dout)

            step()  # warm-up (caches of the ring plan)
            results[f"peak-{layout}-{local_len}"] = allocation_trace(step)[1]
    return results


@functools.lru_cache(maxsize=None)
def ring_results():
    return run_world(2, ring_memory, timeout=300)


def test_kernel_memory_does_not_grow():
    """flash_attn_func (both backends, causal and window) and flash_attn_varlen_func: 20 more calls, no growth."""
    from dist_attn.kernels import flash_attn_func, flash_attn_varlen_func

    for backend, seqlen in (("torch", 96), ("triton", 40)):  # the Triton interpreter is slow: smaller
        q, k, v, dout = _inputs(seqlen)
        for causal, window in ((True, None), (False, (7, 2))):
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


def test_ring_peak_memory_is_linear_in_the_local_sequence():
    """Per rank, world 2, L = 512 and 1024: peak <= peak_bound (module docstring) and linear growth in L."""
    short, long = LOCAL_LENGTHS
    for rank, results in enumerate(ring_results()):
        for layout in ("zigzag", "contiguous"):
            peaks = {n: results[f"peak-{layout}-{n}"] for n in LOCAL_LENGTHS}
            bounds = {n: peak_bound(SHAPE["batch"], n, SHAPE["nheads"], SHAPE["nheads_kv"], SHAPE["headdim"])
                      for n in LOCAL_LENGTHS}
            for n in LOCAL_LENGTHS:
                assert peaks[n] <= bounds[n], f"rank {rank} {layout} L={n}: peak {peaks[n]} > bound {bounds[n]}"
            # doubling L may add at most the sequence term of the bound at L (8 x (S + 2 Skv)): linear growth;
            # an L x L score matrix would add 3 x B * H * L^2 * 4 bytes (12.6 MB here)
            seq_term = 8 * SHAPE["batch"] * short * (SHAPE["nheads"] + 2 * SHAPE["nheads_kv"]) * SHAPE["headdim"] * 4
            assert peaks[long] - peaks[short] <= seq_term, (
                f"rank {rank} {layout}: peak {peaks[short]} at L={short}, {peaks[long]} at L={long}: grows faster "
                f"than linearly (allowed increase {seq_term})")
