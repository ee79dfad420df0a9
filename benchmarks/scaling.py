"""Cost model of exact sequence-parallel attention (ring, Ulysses, hybrid, all-gather KV), with a CPU validation.

Everything in the scaling tables and plots is MODELLED (formulas below); only the kernel throughput on CPU,
the gloo link (benchmarks/results/comm_gloo.json) and the validation's "measured" column are measured.

Notation: N total tokens, w ranks, L = N / w tokens per rank, B batch, H query heads, Hk K/V heads, D head
dim, e bytes per element, F_fwd / F_bwd kernel throughput (FLOP/s, flash-attn convention: 4*D FLOPs per
visible (query, key) pair and head forward, 2.5x that backward), a link = (alpha s, beta bytes/s) and
T(n) = alpha + n / beta for a message of n bytes (0 for n = 0).

Ring (layout contiguous, zigzag or striped; ``dist_attn.ring``). At step s rank r holds the K/V block of rank
(r - s) mod w; P[s, r] = visible (q, k) pairs of that step (exact, from the layout's segments: the same pairs
``visible_pairs`` launches; causal counts positions k <= q). The ranks advance in lock step, so a step costs
its busiest rank (for causal contiguous that is the last rank: the critical path is the busiest rank):
  c_fwd(s) = max_r P[s, r] * B * H * 4D / F_fwd            c_bwd(s) = max_r P[s, r] * B * H * 10D / F_bwd
  T_kv = T(2*B*L*Hk*D*e)                                   T_dkv = T(2*B*L*Hk*D*4)   (fp32 dK/dV accumulators)
  fwd = sum_s [max(c_fwd(s), T_kv [s < w-1]) + overhead]
  bwd = sum_s [max(c_bwd(s), T_kv [s < w-1] + T_dkv [s >= 1]) + overhead] + T_dkv   (w dK/dV hops, the last one
        after the last kernel)
The link of a flat ring is its slowest hop: the intra-node link (NVLink) while w <= gpus_per_node, else the
inter-node link (InfiniBand).

Hierarchical ring ("ring-hierarchical", BurstAttention-style double ring; zigzag layout, so every off-diagonal
block has the same causal work). w = nodes x g, g = min(w, gpus_per_node), rank (n, i) = n*g + i. Outer step
o = 0..nodes-1: node n works on the block set of node (n - o) mod nodes, which circulates on the intra-node
ring (g inner steps; at inner step s rank (n, i) holds block ((n - o) mod nodes, (i - s) mod g)). Meanwhile
every rank sends the block it started the outer step with to rank (n + 1, i) over its own inter-node link
(prefetch of the next outer step: one block per rank per outer step). Per outer step, with the flat-ring step
terms above on the intra link (c over the hierarchical P, T_kv hops for s < g-1, T_dkv hops for s >= 1):
  fwd(o) = max(sum_s [max(c_fwd, T_kv^intra [s < g-1]) + overhead], T_kv^inter [o < nodes-1])
  bwd(o) = max(sum_s [max(c_bwd, T_kv^intra [s < g-1] + T_dkv^intra [s >= 1]) + overhead],
               T_kv^inter [o < nodes-1] + T_dkv^inter [o >= 1])
  fwd = sum_o fwd(o); bwd = sum_o bwd(o) + T_dkv^inter (T_dkv^intra with one node)
Assumed dK/dV path: a block's fp32 accumulator follows it around the inner ring; after the g-th kernel it is
on rank (n, i-1) and goes straight over the inter-node link to rank (n+1, i-1), which holds that block's next
accumulator at the end of the next outer step and adds it (the same rail, overlapped with that step; no
intra-node return hop). After the last outer step one inter-node hop returns every accumulator to its owner,
as the flat ring's last hop does. The prefetch needs extra buffers (memory: + 2 K/V blocks + 2 fp32 dK/dV blocks
per rank, the inter-node send and receive copies). With one node this is the flat ring (same terms); with more
nodes the flat ring pays T^inter at every one of its w steps, the hierarchical ring once per g steps.

Ulysses (u = w, needs H % u == 0): all-to-all of q, k, v in and out back (bwd: dout in, dq, dk, dv back);
bytes per rank = ``benchmarks.comm_volume.formula`` (u-1)/u * B*L*D*e * (2H + 2Hk'), Hk' = max(Hk, u), as 4
collectives: fwd = bwd = 4*alpha + bytes/beta + kernel on the full sequence with H/u heads + overhead.

Hybrid u x r (u = largest power of two <= min(w, gpus_per_node) dividing H, r = w / u): the Ulysses terms with u
over the intra-node link, then a zigzag ring of r ranks on blocks of N/r tokens with H/u query heads and
K/V messages of 2*B*L*Hk'*D*e bytes (the ring term of ``formula``), over the link of a flat ring of w.

All-gather KV (no overlap): fwd = (w-1) * T_kv (ring all-gather) + kernel (local queries, zigzag, against
all keys) + overhead; bwd = (w-1) * T_kv (gather again) + kernel + (w-1) * T_dkv (reduce-scatter of fp32
dK/dV) + overhead.

Efficiency = single-GPU kernel time of the same work (all visible pairs of the full sequence, fwd + bwd) /
(w * modelled fwd + bwd time). Weak scaling: fixed L per rank; strong scaling: fixed N.

Hidden communication (balanced causal ring, continuous pair count L^2/2): compute = transfer solves
a L^2 = b L + alpha with a = B*H*k*D/F (k = 2 fwd, 5 bwd), b = 2*B*Hk*D*m/beta (m = e fwd, e + 4 bwd):
L* = (b + sqrt(b^2 + 4 a alpha)) / (2a); blocks longer than L* hide the ring's communication.

Memory per rank (bytes of the attention layer's tensors only; no weights, no other activations):
  ring: q, out B*L*H*D*e each; k, v B*L*Hk*D*e each; lse B*H*L*4; two K/V buffers 2 * 2*B*L*Hk*D*e; dK/dV
        accumulators (the one being filled and the one in flight) 2 * 2*B*L*Hk*D*4
  Ulysses: local q, k, v, out + their all-to-all copies (N tokens, H/u and Hk'/u heads) + lse B*(H/u)*N*4
  hybrid: local q, k, v, out + all-to-all copies (N/r tokens) + the ring terms for blocks of N/r tokens
  all-gather KV: q, k, v, out, lse + full K, V 2*B*N*Hk*D*e + full fp32 dK/dV 2*B*N*Hk*D*4

GPU kernel throughput comes from a committed benchmarks/results/kernel_*.md (``ours`` rows of benchmarks.kernel)
when one exists; otherwise it is PENDING and an ASSUMED placeholder (--gpu-fwd-tflops, --gpu-bwd-tflops) is
used, labelled as such in every GPU table and plot title. Link presets: NVLink 450 GB/s per direction, InfiniBand
50 GB/s per GPU (bandwidths from the spec sheets; their latencies are ASSUMED), "measured" = comm_gloo.json.

Validation (CPU, gloo): the ring's fwd+bwd time predicted from the CPU kernel throughput measured here and the
gloo alpha/beta, then measured with benchmarks.ring_cpu's worker (``_ring_worker`` via launch.spawn.run_world).

    python -m benchmarks.scaling                      # writes benchmarks/results/scaling_cpu.md and .png (~1-3 min)
                                                      # and scaling_cpu_hierarchical.md and .png (flat vs
                                                      # hierarchical ring, 1..128 nodes of 8 GPUs)
    python -m benchmarks.scaling --validate-worlds 1 2 --validate-seqlen 64 --tag smoke --out-dir /tmp/x
    python -m benchmarks.scaling --help
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, machine_name, md_row, versions, write_result
from benchmarks.comm_volume import formula as volume_formula
from benchmarks.ring_sim import full_count
from dist_attn.layouts import segments

ELEM_BYTES = {"float32": 4, "bfloat16": 2}
ACC_BYTES = 4                      # fp32 dK/dV accumulators
FWD_FLOPS_PER_PAIR = 4             # x D per visible pair and head
BWD_FACTOR = 2.5
STRATEGIES = ("ring-contiguous", "ring-zigzag", "ring-striped", "ring-hierarchical", "ulysses", "hybrid",
              "allgather-kv")
GPU_FWD_TFLOPS_ASSUMED = 350.0     # ASSUMED placeholder, used only while no kernel_*.md exists
GPU_BWD_TFLOPS_ASSUMED = 250.0


# ------------------------------------------------------------------------------------------ configs

def _need(ok, msg):
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class Link:
    name: str
    alpha_s: float
    beta_bytes_per_s: float
    source: str = "preset"

    def __post_init__(self):
        _need(self.alpha_s >= 0 and math.isfinite(self.alpha_s), f"link {self.name}: alpha_s must be >= 0")
        _need(self.beta_bytes_per_s > 0, f"link {self.name}: beta_bytes_per_s must be > 0")

    def time(self, nbytes):
        return self.alpha_s + nbytes / self.beta_bytes_per_s if nbytes > 0 else 0.0


NVLINK = Link("NVLink", 10e-6, 450e9, "preset: 450 GB/s per direction, latency 10 us ASSUMED")
INFINIBAND = Link("InfiniBand", 20e-6, 50e9, "preset: 50 GB/s per GPU, latency 20 us ASSUMED")


def measured_link(path=RESULTS_DIR / "comm_gloo.json"):
    data = json.loads(Path(path).read_text())
    return Link("gloo (measured)", data["alpha_s"], data["beta_bytes_per_s"], f"measured: {Path(path).name}, "
                f"{data.get('device', '?')}, {data.get('date', '?')}")


@dataclass(frozen=True)
class Hardware:
    """Kernel throughput, per-step overhead and the links of a cluster (intra-node up to gpus_per_node)."""
    name: str
    fwd_flops_per_s: float
    bwd_flops_per_s: float
    intra: Link
    inter: Link
    gpus_per_node: int = 8
    overhead_s: float = 0.0
    throughput_source: str = ""

    def __post_init__(self):
        _need(self.fwd_flops_per_s > 0 and self.bwd_flops_per_s > 0, "throughput must be > 0")
        _need(isinstance(self.gpus_per_node, int) and self.gpus_per_node >= 1, "gpus_per_node must be an int >= 1")
        _need(self.overhead_s >= 0, "overhead_s must be >= 0")

    def link(self, ranks):
        """The slowest link of a group of ``ranks`` consecutive ranks (a flat ring or an all-to-all)."""
        return self.intra if ranks <= self.gpus_per_node else self.inter


@dataclass(frozen=True)
class Shape:
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    headdim: int = 128
    dtype: str = "bfloat16"
    causal: bool = True

    def __post_init__(self):
        for name in ("batch", "heads", "kv_heads", "headdim"):
            v = getattr(self, name)
            _need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an int >= 1; got {v!r}")
        _need(self.heads % self.kv_heads == 0, f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        _need(self.dtype in ELEM_BYTES, f"dtype must be one of {sorted(ELEM_BYTES)}; got {self.dtype!r}")

    @property
    def e(self):
        return ELEM_BYTES[self.dtype]


# ------------------------------------------------------------------------------------------ the model

def _causal_count(a, b, s, n, m):
    """Pairs (i < n, j < m) with b + j*s <= a + i*s (arrays a, b; same stride s): sum_i clamp(c + i, 0, m),
    c = floor((a - b) / s) + 1."""
    c = np.floor_divide(a - b, s) + 1

    def F(x):  # sum_{t <= x} clamp(t, 0, m)
        x = np.asarray(x, dtype=np.int64)
        return np.where(x <= 0, 0, np.where(x <= m, x * (x + 1) // 2, m * (m + 1) // 2 + (x - m) * m))
    return F(c + n - 1) - F(c - 1)


def _segs(layout, ranks, w, L):
    """(offset array shaped like ``ranks``, stride, length) per segment index, from
    ``dist_attn.layouts.segments`` (the only place that knows which positions a rank holds)."""
    per_rank = [segments(layout, rank, w, L) for rank in range(w)]
    return [(np.array([segs[i].offset for segs in per_rank], dtype=np.int64)[ranks], seg.stride, seg.length)
            for i, seg in enumerate(per_rank[0])]


def _pairs(layout, w, L, causal, src):
    """int64 array shaped like ``src`` [step, rank]: visible pairs of rank r's queries against the K/V block of
    rank src[step, r]."""
    if not causal:
        return np.full(src.shape, L * L, dtype=np.int64)
    ranks = np.arange(w, dtype=np.int64)[None, :]
    total = np.zeros(src.shape, dtype=np.int64)
    for qa, s, n in _segs(layout, ranks, w, L):
        for ka, _, m in _segs(layout, src, w, L):
            total += _causal_count(qa, ka, s, n, m)
    return total


@lru_cache(maxsize=None)
def pair_counts(layout, w, L, causal):
    """int64 array [step, rank]: visible (q, k) pairs per head and batch element at each ring step."""
    ranks = np.arange(w, dtype=np.int64)[None, :]
    return _pairs(layout, w, L, causal, (ranks - np.arange(w, dtype=np.int64)[:, None]) % w)


@lru_cache(maxsize=None)
def hierarchical_pair_counts(layout, nodes, g, L, causal):
    """int64 array [outer, inner, rank] of the hierarchical ring (w = nodes * g, rank = node * g + i): at outer
    step o, inner step s rank (n, i) holds the block of rank ((n - o) mod nodes, (i - s) mod g)."""
    w = nodes * g
    r = np.arange(w, dtype=np.int64)
    o, s = np.divmod(np.arange(w, dtype=np.int64), g)
    src = ((r // g - o[:, None]) % nodes) * g + (r % g - s[:, None]) % g
    return _pairs(layout, w, L, causal, src).reshape(nodes, g, w)


def kernel_time(pairs, shape, heads, hw, bwd):
    flops = pairs * shape.batch * heads * FWD_FLOPS_PER_PAIR * shape.headdim * (BWD_FACTOR if bwd else 1.0)
    return flops / (hw.bwd_flops_per_s if bwd else hw.fwd_flops_per_s)


def ring_times(shape, hw, link, layout, r, block, q_heads, kv_bytes):
    """(fwd s, bwd s) of a ring of r ranks holding ``block`` tokens with ``q_heads`` query heads; one K/V
    message is ``kv_bytes`` (its fp32 dK/dV message is kv_bytes * 4 / e)."""
    fwd, bwd = ring_steps(pair_counts(layout, r, block, shape.causal).max(axis=1), shape, hw, link, q_heads, kv_bytes)
    return sum(fwd), sum(bwd) + (link.time(kv_bytes * ACC_BYTES // shape.e) if r > 1 else 0.0)


def ring_steps(busiest, shape, hw, link, q_heads, kv_bytes):
    """([fwd s], [bwd s]) per lock-step ring step (busiest = the busiest rank's pairs per step), without the
    last dK/dV hop after the last kernel."""
    r = len(busiest)
    t_kv, t_dkv = link.time(kv_bytes), link.time(kv_bytes * ACC_BYTES // shape.e)
    fwd, bwd = [], []
    for s in range(r):
        kv = t_kv if s < r - 1 else 0.0
        fwd.append(max(kernel_time(int(busiest[s]), shape, q_heads, hw, False), kv) + hw.overhead_s)
        bwd.append(max(kernel_time(int(busiest[s]), shape, q_heads, hw, True), kv + (t_dkv if s >= 1 else 0.0))
                   + hw.overhead_s)
    return fwd, bwd


def hierarchical_steps(shape, hw, w, L, kv_bytes):
    """([fwd s], [bwd s]) per outer step and the last dK/dV hop (s) of the hierarchical (double) ring on
    w = nodes x g ranks, zigzag layout (module docstring): per outer step an inner ring of g ranks over
    ``hw.intra`` overlapped with one ``hw.inter`` hop per rank."""
    g = min(w, hw.gpus_per_node)
    nodes = w // g
    busiest = hierarchical_pair_counts("zigzag", nodes, g, L, shape.causal).max(axis=2)
    dkv_bytes = kv_bytes * ACC_BYTES // shape.e
    t_kv, t_dkv = hw.inter.time(kv_bytes), hw.inter.time(dkv_bytes)
    fwd, bwd = [], []
    for o in range(nodes):
        inner_fwd, inner_bwd = ring_steps(busiest[o], shape, hw, hw.intra, shape.heads, kv_bytes)
        kv = t_kv if o < nodes - 1 else 0.0
        fwd.append(max(sum(inner_fwd), kv))
        bwd.append(max(sum(inner_bwd), kv + (t_dkv if o >= 1 else 0.0)))
    tail = t_dkv if nodes > 1 else hw.intra.time(dkv_bytes) if g > 1 else 0.0   # last dK/dV hop to the owner
    return fwd, bwd, tail


def hierarchical_ring_times(shape, hw, w, L, kv_bytes):
    fwd, bwd, tail = hierarchical_steps(shape, hw, w, L, kv_bytes)
    return sum(fwd), sum(bwd) + tail


def _volume_cfg(shape, N, w):
    return SimpleNamespace(batch=shape.batch, seqlen=N, world_size=w, heads=shape.heads, kv_heads=shape.kv_heads,
                           headdim=shape.headdim, dtype=shape.dtype)


def all_to_all_bytes(shape, N, w, u):
    """Bytes one rank sends in the Ulysses all-to-alls of one layer (fwd; bwd the same): comm_volume.formula."""
    return volume_formula(_volume_cfg(shape, N, w), u, 1)[0]


def hybrid_degree(shape, w, hw):
    u = 1
    while u * 2 <= min(w, hw.gpus_per_node) and shape.heads % (u * 2) == 0 and w % (u * 2) == 0:
        u *= 2
    return u


def kv_heads_eff(shape, u):
    return max(shape.kv_heads, u) if u > 1 else shape.kv_heads


def feasible(strategy, shape, N, w, hw):
    """'' when the strategy can run N tokens on w ranks, else why not."""
    layout_mult = 2 * w if strategy in ("ring-zigzag", "ring-hierarchical", "hybrid", "allgather-kv") else w
    if N % layout_mult:
        return f"N % {layout_mult} != 0"
    if strategy == "ring-hierarchical" and w > hw.gpus_per_node and w % hw.gpus_per_node:
        return f"w % gpus_per_node ({hw.gpus_per_node}) != 0"
    if strategy == "ulysses":
        if shape.heads % w:
            return f"heads ({shape.heads}) % w != 0"
        if w > 1 and not (shape.kv_heads % w == 0 or w % shape.kv_heads == 0):
            return "kv_heads and w do not divide"
    return ""


def model(strategy, shape, hw, N, w):
    """dict(fwd=s, bwd=s, total=s, efficiency, memory=bytes) or None when infeasible."""
    if feasible(strategy, shape, N, w, hw):
        return None
    B, H, Hk, D, e = shape.batch, shape.heads, shape.kv_heads, shape.headdim, shape.e
    L = N // w
    kv_block = 2 * B * L * Hk * D * e
    if strategy == "ring-hierarchical":
        fwd, bwd = hierarchical_ring_times(shape, hw, w, L, kv_block)
    elif strategy.startswith("ring-"):
        fwd, bwd = ring_times(shape, hw, hw.link(w), strategy[5:], w, L, H, kv_block)
    elif strategy == "ulysses":
        a2a = 4 * hw.link(w).alpha_s + all_to_all_bytes(shape, N, w, w) / hw.link(w).beta_bytes_per_s if w > 1 else 0.0
        pairs = full_count(N, shape.causal)
        fwd = a2a + kernel_time(pairs, shape, H // w, hw, False) + hw.overhead_s
        bwd = a2a + kernel_time(pairs, shape, H // w, hw, True) + hw.overhead_s
    elif strategy == "hybrid":
        u = hybrid_degree(shape, w, hw)
        r = w // u
        a2a = 4 * hw.link(u).alpha_s + all_to_all_bytes(shape, N, w, u) / hw.link(u).beta_bytes_per_s if u > 1 else 0.0
        ring_kv = 2 * B * L * kv_heads_eff(shape, u) * D * e
        rf, rb = ring_times(shape, hw, hw.link(w), "zigzag", r, N // r, H // u, ring_kv)
        fwd, bwd = a2a + rf, a2a + rb
    elif strategy == "allgather-kv":
        link = hw.link(w)
        gather = (w - 1) * link.time(kv_block)
        pairs = int(pair_counts("zigzag", w, L, shape.causal).sum(axis=0).max())
        fwd = gather + kernel_time(pairs, shape, H, hw, False) + hw.overhead_s
        bwd = gather + kernel_time(pairs, shape, H, hw, True) + (w - 1) * link.time(kv_block * ACC_BYTES // e) \
            + hw.overhead_s
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    pairs = full_count(N, shape.causal)
    single = kernel_time(pairs, shape, H, hw, False) + kernel_time(pairs, shape, H, hw, True)
    return dict(fwd=fwd, bwd=bwd, total=fwd + bwd, efficiency=single / (w * (fwd + bwd)),
                memory=memory_per_rank(strategy, shape, N, w, hw))


def _ring_memory(B, L, Hq, Hk, D, e):
    return (2 * B * L * Hq * D * e + 2 * B * L * Hk * D * e + B * Hq * L * 4
            + 2 * (2 * B * L * Hk * D * e) + 2 * (2 * B * L * Hk * D * ACC_BYTES))


def memory_per_rank(strategy, shape, N, w, hw):
    B, H, Hk, D, e = shape.batch, shape.heads, shape.kv_heads, shape.headdim, shape.e
    L = N // w
    local = 2 * B * L * H * D * e + 2 * B * L * Hk * D * e          # q, out, k, v
    if strategy == "ring-hierarchical" and w > hw.gpus_per_node:   # + inter-node send/receive K/V and dK/dV
        return _ring_memory(B, L, H, Hk, D, e) + 2 * (2 * B * L * Hk * D * e) + 2 * (2 * B * L * Hk * D * ACC_BYTES)
    if strategy.startswith("ring-"):
        return _ring_memory(B, L, H, Hk, D, e)
    if strategy == "ulysses":
        if w == 1:
            return local + B * H * N * 4
        hk = kv_heads_eff(shape, w) // w if w > 1 else Hk
        return local + 2 * B * N * (H // w) * D * e + 2 * B * N * hk * D * e + B * (H // w) * N * 4
    if strategy == "hybrid":
        u = hybrid_degree(shape, w, hw)
        r = w // u
        hk = max(kv_heads_eff(shape, u) // u, 1)
        return (local if u > 1 else 0) + _ring_memory(B, N // r, H // u, hk, D, e)
    if strategy == "allgather-kv":
        return local + B * H * L * 4 + 2 * B * N * Hk * D * e + 2 * B * N * Hk * D * ACC_BYTES
    raise ValueError(strategy)


def hidden_block_length(shape, hw, link, bwd):
    """Tokens per rank above which a balanced causal ring step's compute >= its transfer (module docstring)."""
    k = (FWD_FLOPS_PER_PAIR / 2) * (BWD_FACTOR if bwd else 1.0) * (1 if shape.causal else 2)
    a = shape.batch * shape.heads * k * shape.headdim / (hw.bwd_flops_per_s if bwd else hw.fwd_flops_per_s)
    b = 2 * shape.batch * shape.kv_heads * shape.headdim * (shape.e + (ACC_BYTES if bwd else 0)) / link.beta_bytes_per_s
    return (b + math.sqrt(b * b + 4 * a * link.alpha_s)) / (2 * a)


# ------------------------------------------------------------------------------------------ throughput

def gpu_kernel_result(results_dir=RESULTS_DIR):
    """(fwd TFLOP/s, bwd TFLOP/s, file) from the newest committed kernel_*.md ("ours" rows of the comparison
    table, causal, longest seqlen), or None while no such file exists."""
    files = sorted(Path(results_dir).glob("kernel_*.md"), key=lambda p: p.stat().st_mtime)
    for path in reversed(files):
        best = {}
        for line in path.read_text().splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) >= 6 and cells[3] in ("fwd", "bwd") and cells[1] == "true":
                try:
                    seqlen, tflops = int(cells[2]), float(cells[5])
                except ValueError:
                    continue
                if cells[3] not in best or seqlen >= best[cells[3]][0]:
                    best[cells[3]] = (seqlen, tflops)
        if "fwd" in best and "bwd" in best:
            return best["fwd"][1], best["bwd"][1], path.name
    return None


def measure_cpu_throughput(seqlens, threads, shape, iters=3):
    """{threads: (fwd FLOP/s, bwd FLOP/s, per-case rows)}: dist_attn.kernels.flash_attn_func(backend="torch"), median."""
    from dist_attn.kernels import flash_attn_func
    out, before = {}, torch.get_num_threads()
    try:
        for t in threads:
            torch.set_num_threads(t)
            rows = []
            for n in seqlens:
                gen = torch.Generator().manual_seed(0)
                q, k, v, dout = (torch.randn(shape.batch, n, h, shape.headdim, generator=gen)
                                 for h in (shape.heads, shape.kv_heads, shape.kv_heads, shape.heads))
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                ts = []
                for it in range(iters + 1):
                    q.grad = k.grad = v.grad = None
                    t0 = time.perf_counter()
                    o = flash_attn_func(q, k, v, causal=shape.causal, backend="torch")
                    t1 = time.perf_counter()
                    o.backward(dout)
                    t2 = time.perf_counter()
                    if it:
                        ts.append((t1 - t0, t2 - t1))
                fwd_s, bwd_s = (statistics.median(x[i] for x in ts) for i in (0, 1))
                flops = full_count(n, shape.causal) * shape.batch * shape.heads * FWD_FLOPS_PER_PAIR * shape.headdim
                rows.append((n, fwd_s, bwd_s, flops / fwd_s, flops * BWD_FACTOR / bwd_s))
            out[t] = (statistics.median(r[3] for r in rows), statistics.median(r[4] for r in rows), rows)
    finally:
        torch.set_num_threads(before)
    return out


# ------------------------------------------------------------------------------------------ validation

def measure_ring(worlds, seqlen, shape, iters, warmup, timeout_s=600):
    """{world: (median fwd ms, median bwd ms, threads/rank)} from benchmarks.ring_cpu's worker."""
    from benchmarks.ring_cpu import PG_TIMEOUT_S, RingBenchConfig, _ring_worker
    from launch.spawn import run_world
    out = {}
    for w in worlds:
        cfg = RingBenchConfig(worlds=[w], seqlens=[seqlen], layouts=["zigzag"], causal=[shape.causal],
                              batch=shape.batch, heads=shape.heads, kv_heads=shape.kv_heads, headdim=shape.headdim,
                              iters=iters, warmup=warmup, timeout_s=timeout_s)
        per_rank = run_world(w, _ring_worker, cfg, timeout=timeout_s, pg_timeout_s=PG_TIMEOUT_S, threads=cfg.threads(w))
        times = per_rank[0][0]["times"]
        out[w] = (statistics.median(t[0] for t in times), statistics.median(t[1] for t in times), cfg.threads(w))
    return out


# ------------------------------------------------------------------------------------------ the run

@dataclass
class ScalingConfig:
    """One run; each field is the CLI flag of the same name (underscores as dashes)."""
    tag: str = "cpu"
    max_world: int = 1024
    weak_block: int = 16384                 # tokens per rank (weak scaling)
    strong_seqlens: list[int] = field(default_factory=lambda: [131072, 1048576, 10485760])
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    headdim: int = 128
    dtype: str = "bfloat16"
    gpus_per_node: int = 8
    gpu_overhead_us: float = 20.0           # ASSUMED per-step overhead on GPUs (launch, merge)
    gpu_fwd_tflops: float = GPU_FWD_TFLOPS_ASSUMED
    gpu_bwd_tflops: float = GPU_BWD_TFLOPS_ASSUMED
    hier_tokens_per_gpu: list[int] = field(default_factory=lambda: [1024, 2048, 8192, 32768])
    hier_max_nodes: int = 128               # flat vs hierarchical ring: 1, 2, 4, ... nodes of gpus_per_node GPUs
    cpu_throughput_seqlens: list[int] = field(default_factory=lambda: [1024, 2048])
    validate_worlds: list[int] = field(default_factory=lambda: [1, 2, 4])
    validate_seqlen: int = 4096
    validate_heads: int = 8
    validate_kv_heads: int = 2
    validate_headdim: int = 64
    validate_iters: int = 5
    validate_warmup: int = 1
    comm_json: str = str(RESULTS_DIR / "comm_gloo.json")
    out_dir: str = str(RESULTS_DIR)

    def __post_init__(self):
        _need(re.fullmatch(r"[A-Za-z0-9_-]+", self.tag or "") is not None, f"tag must be [A-Za-z0-9_-]+; got {self.tag!r}")
        _need(self.max_world >= 1 and self.max_world & (self.max_world - 1) == 0, "max_world must be a power of two")
        _need(self.weak_block >= 2 and self.weak_block % 2 == 0, "weak_block must be even and >= 2")
        _need(bool(self.strong_seqlens) and all(s >= 2 for s in self.strong_seqlens), "strong_seqlens must be >= 2")
        Shape(self.batch, self.heads, self.kv_heads, self.headdim, self.dtype)
        Shape(self.batch, self.validate_heads, self.validate_kv_heads, self.validate_headdim, "float32")
        _need(self.gpu_fwd_tflops > 0 and self.gpu_bwd_tflops > 0 and self.gpu_overhead_us >= 0, "bad GPU numbers")
        _need(all(w >= 1 for w in self.validate_worlds), "validate_worlds must be >= 1 (empty: no validation)")
        _need(all(self.validate_seqlen % (2 * w) == 0 for w in self.validate_worlds),
              "validate_seqlen must be a multiple of 2 * every validate world")
        _need(self.validate_iters >= 1 and self.validate_warmup >= 0, "validate_iters >= 1, validate_warmup >= 0")
        _need(bool(self.cpu_throughput_seqlens), "cpu_throughput_seqlens must not be empty")
        _need(bool(self.hier_tokens_per_gpu) and all(t >= 2 and t % 2 == 0 for t in self.hier_tokens_per_gpu),
              "hier_tokens_per_gpu must be even and >= 2 (zigzag)")
        _need(self.hier_max_nodes >= 1 and self.hier_max_nodes & (self.hier_max_nodes - 1) == 0,
              "hier_max_nodes must be a power of two")

    def worlds(self):
        return [2 ** i for i in range(int(math.log2(self.max_world)) + 1)]

    def nodes(self):
        return [2 ** i for i in range(int(math.log2(self.hier_max_nodes)) + 1)]

    def shape(self):
        return Shape(self.batch, self.heads, self.kv_heads, self.headdim, self.dtype, True)

    def validate_shape(self):
        return Shape(self.batch, self.validate_heads, self.validate_kv_heads, self.validate_headdim, "float32", True)


def _fmt_eff(res):
    return "n/a" if res is None else f"{res['efficiency']:.3f}"


def _gib(x):
    return f"{x / 2**30:.3g}"


def run(cfg):
    shape, vshape = cfg.shape(), cfg.validate_shape()
    load_before = os.getloadavg()[0]
    kernel = gpu_kernel_result(cfg.out_dir if Path(cfg.out_dir).exists() else RESULTS_DIR)
    if kernel:
        gpu_fwd, gpu_bwd, src = kernel[0] * 1e12, kernel[1] * 1e12, f"measured GPU kernel ({kernel[2]})"
        gpu_label = f"kernel throughput from {kernel[2]}"
    else:
        gpu_fwd, gpu_bwd = cfg.gpu_fwd_tflops * 1e12, cfg.gpu_bwd_tflops * 1e12
        src = "ASSUMED placeholder (GPU kernel result pending)"
        gpu_label = f"ASSUMED kernel {cfg.gpu_fwd_tflops:g}/{cfg.gpu_bwd_tflops:g} TFLOP/s fwd/bwd (GPU result pending)"
    gpu = Hardware("GPU cluster", gpu_fwd, gpu_bwd, NVLINK, INFINIBAND, cfg.gpus_per_node, cfg.gpu_overhead_us * 1e-6, src)
    gloo = measured_link(cfg.comm_json)
    cores = os.cpu_count() or 1
    tp = measure_cpu_throughput(cfg.cpu_throughput_seqlens, sorted({1, cores}), vshape)
    worlds = cfg.worlds()
    weak = {s: [model(s, shape, gpu, cfg.weak_block * w, w) for w in worlds] for s in STRATEGIES}
    strong = {(n, s): [model(s, shape, gpu, n, w) for w in worlds] for n in cfg.strong_seqlens for s in STRATEGIES}
    hier = {(L, s): [model(s, shape, gpu, L * n * cfg.gpus_per_node, n * cfg.gpus_per_node) for n in cfg.nodes()]
            for L in cfg.hier_tokens_per_gpu for s in ("ring-zigzag", "ring-hierarchical")}
    hidden = {(link.name, bwd): hidden_block_length(shape, gpu, link, bwd) for link in (NVLINK, INFINIBAND)
              for bwd in (False, True)}
    cpu_hw = Hardware("CPU", tp[1][0], tp[1][1], gloo, gloo, 10**9, 0.0, "measured, 1 thread")
    hidden_cpu = {bwd: hidden_block_length(vshape, cpu_hw, gloo, bwd) for bwd in (False, True)}
    validation = []
    if cfg.validate_worlds:
        measured = measure_ring(cfg.validate_worlds, cfg.validate_seqlen, vshape, cfg.validate_iters, cfg.validate_warmup)
        for w in cfg.validate_worlds:
            fwd_ms, bwd_ms, threads = measured[w]
            f, b, _ = tp.get(threads) or tp[1]
            hw = Hardware("CPU", f, b, gloo, gloo, 10**9, 0.0)
            pred = model("ring-zigzag", vshape, hw, cfg.validate_seqlen, w)
            oversub = max(1.0, w * threads / cores)
            hw_c = Hardware("CPU", f / oversub, b / oversub, gloo, gloo, 10**9, 0.0)
            pred_c = model("ring-zigzag", vshape, hw_c, cfg.validate_seqlen, w)
            validation.append(dict(world=w, threads=threads, oversub=oversub, pred_ms=pred["total"] * 1e3,
                                   pred_fwd_ms=pred["fwd"] * 1e3, pred_bwd_ms=pred["bwd"] * 1e3,
                                   pred_c_ms=pred_c["total"] * 1e3, meas_fwd_ms=fwd_ms, meas_bwd_ms=bwd_ms,
                                   meas_ms=fwd_ms + bwd_ms))
    return dict(cfg=cfg, shape=shape, vshape=vshape, gpu=gpu, gpu_label=gpu_label, kernel=kernel, gloo=gloo, tp=tp,
                worlds=worlds, weak=weak, strong=strong, hier=hier, hidden=hidden, hidden_cpu=hidden_cpu, validation=validation,
                cores=cores, load=(load_before, os.getloadavg()[0]))


def report(res, argv):
    cfg, shape, gpu, worlds = res["cfg"], res["shape"], res["gpu"], res["worlds"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    label = res["gpu_label"]
    shp = f"B{shape.batch} H{shape.heads}/{shape.kv_heads} D{shape.headdim} {shape.dtype} causal"
    lines = [f"# Scaling cost model of exact attention ({cfg.tag})", "",
             "**MODELLED** unless a line or column says measured: the scaling, hidden-communication and memory "
             "tables are outputs of the cost model in `benchmarks/scaling.py` (formulas in its docstring), not "
             "measurements. Only the CPU kernel throughput, the gloo link and the validation's measured column are "
             "measured on this machine.", "",
             f"- machine: {machine_name()}; {versions()}; {now}",
             "- command: `" + shlex.join(["python", "-m", "benchmarks.scaling", *argv]) + "`",
             f"- 1-minute load average before / after the run: {res['load'][0]:.2f} / {res['load'][1]:.2f} on "
             f"{res['cores']} cores (other work on these cores slows every measured number here)",
             f"- GPU kernel throughput: {'measured, ' + res['kernel'][2] if res['kernel'] else 'PENDING (no benchmarks/results/kernel_*.md yet)'}"
             f"; GPU projections use {gpu.fwd_flops_per_s / 1e12:g} / {gpu.bwd_flops_per_s / 1e12:g} TFLOP/s fwd/bwd: "
             f"{gpu.throughput_source}; per-step overhead {gpu.overhead_s * 1e6:g} us (ASSUMED)",
             f"- links: {NVLINK.name} {NVLINK.beta_bytes_per_s / 1e9:g} GB/s ({NVLINK.source}); {INFINIBAND.name} "
             f"{INFINIBAND.beta_bytes_per_s / 1e9:g} GB/s ({INFINIBAND.source}); {cfg.gpus_per_node} GPUs per node: "
             "a group of more ranks than that runs at the InfiniBand rate (its slowest link)",
             f"- {res['gloo'].name}: alpha {res['gloo'].alpha_s * 1e6:.1f} us, beta "
             f"{res['gloo'].beta_bytes_per_s / 1e9:.2f} GB/s ({res['gloo'].source})",
             f"- GPU shape: {shp}; hybrid = Ulysses over min(8, heads) ranks of a node x zigzag ring across",
             "", "## CPU kernel throughput (measured)", "",
             f"`dist_attn.kernels.flash_attn_func(backend=\"torch\")`, fp32 causal, B{res['vshape'].batch} "
             f"H{res['vshape'].heads}/{res['vshape'].kv_heads} D{res['vshape'].headdim}, median of 3 after 1 warmup",
             "", md_row(["threads", "seqlen", "fwd ms", "bwd ms", "fwd GFLOP/s", "bwd GFLOP/s"]), md_row(["---"] * 6)]
    for t, (f, b, rows) in res["tp"].items():
        for n, fs, bs, ff, bf in rows:
            lines.append(md_row([t, n, f"{fs * 1e3:.2f}", f"{bs * 1e3:.2f}", f"{ff / 1e9:.1f}", f"{bf / 1e9:.1f}"]))
        lines.append(md_row([t, "median (used)", "", "", f"{f / 1e9:.1f}", f"{b / 1e9:.1f}"]))
    head = ["strategy"] + [str(w) for w in worlds]
    lines += ["", f"## Weak scaling: efficiency vs world size, {cfg.weak_block} tokens per rank (MODELLED; {label})", "",
              "efficiency = single-GPU kernel time of the same work / (w x modelled fwd+bwd time); n/a = infeasible "
              "(Ulysses needs w | heads)", "", md_row(head), md_row(["---"] * len(head))]
    lines += [md_row([s] + [_fmt_eff(r) for r in res["weak"][s]]) for s in STRATEGIES]
    for n in cfg.strong_seqlens:
        lines += ["", f"## Strong scaling: efficiency vs world size, {n:,} tokens in all (MODELLED; {label})", "",
                  md_row(head), md_row(["---"] * len(head))]
        lines += [md_row([s] + [_fmt_eff(r) for r in res["strong"][(n, s)]]) for s in STRATEGIES]
        lines += [md_row([f"{s} fwd+bwd s"] + ["n/a" if r is None else f"{r['total']:.3g}" for r in res["strong"][(n, s)]])
                  for s in ("ring-zigzag", "ring-hierarchical", "hybrid")]
    lines += ["", f"## Block length per rank above which the ring hides its communication (MODELLED; {label})", "",
              "balanced causal ring step: compute >= transfer; tokens per rank", "",
              md_row(["link", "forward", "backward"]), md_row(["---"] * 3)]
    for name in (NVLINK.name, INFINIBAND.name):
        lines.append(md_row([name, f"{res['hidden'][(name, False)]:,.0f}", f"{res['hidden'][(name, True)]:,.0f}"]))
    lines.append(md_row([f"{res['gloo'].name}, CPU 1-thread kernel (measured inputs), validation shape",
                         f"{res['hidden_cpu'][False]:,.0f}", f"{res['hidden_cpu'][True]:,.0f}"]))
    n_mem = max(cfg.strong_seqlens)
    lines += ["", f"## Memory per rank, GiB, {n_mem:,} tokens in all, {shp} (MODELLED: attention-layer tensors only)", "",
              md_row(head), md_row(["---"] * len(head))]
    lines += [md_row([s] + ["n/a" if r is None else _gib(r["memory"]) for r in res["strong"][(n_mem, s)]])
              for s in STRATEGIES]
    if res["validation"]:
        v = res["vshape"]
        lines += ["", "## Validation on this CPU: ring (zigzag, causal) fwd+bwd, predicted (MODELLED) vs MEASURED", "",
                  f"seqlen {cfg.validate_seqlen}, fp32, B{v.batch} H{v.heads}/{v.kv_heads} D{v.headdim}; predicted from "
                  "the measured CPU kernel throughput at the rank's thread count and the measured gloo alpha/beta, "
                  "overhead 0; measured with benchmarks.ring_cpu's `_ring_worker` (median of "
                  f"{cfg.validate_iters} after {cfg.validate_warmup} warmup, max over ranks). 'contention-adjusted' "
                  f"divides the kernel throughput by w x threads / cores ({res['cores']} cores).", "",
                  md_row(["world", "threads/rank", "predicted fwd ms", "predicted bwd ms", "predicted fwd+bwd ms",
                          "contention-adjusted predicted ms", "measured fwd ms", "measured bwd ms",
                          "measured fwd+bwd ms", "measured / predicted", "measured / adjusted"]), md_row(["---"] * 11)]
        for r in res["validation"]:
            lines.append(md_row([r["world"], r["threads"], f"{r['pred_fwd_ms']:.1f}", f"{r['pred_bwd_ms']:.1f}",
                                 f"{r['pred_ms']:.1f}", f"{r['pred_c_ms']:.1f}", f"{r['meas_fwd_ms']:.1f}",
                                 f"{r['meas_bwd_ms']:.1f}", f"{r['meas_ms']:.1f}", f"{r['meas_ms'] / r['pred_ms']:.2f}",
                                 f"{r['meas_ms'] / r['pred_c_ms']:.2f}"]))
        over = [r["world"] for r in res["validation"] if r["oversub"] > 1]
        lines += ["", f"Worlds {over} are oversubscribed on this {res['cores']}-core box (more threads than cores): "
                  "the ranks share cores, which the plain prediction (one core per rank) does not model." if over else
                  "No validation world is oversubscribed."]
    return "\n".join(lines) + "\n"


def _step_terms(shape, hw, L, nodes=4):
    """Model terms (s) at L tokens per GPU, w = nodes x g: the kernel of an off-diagonal step, the hops, and the
    cost of one middle outer step (outer step 1: every transfer present) hierarchical vs the same g flat steps."""
    g = hw.gpus_per_node
    w, kv = nodes * g, 2 * shape.batch * L * shape.kv_heads * shape.headdim * shape.e
    busiest = pair_counts("zigzag", w, L, shape.causal).max(axis=1)
    flat_f, flat_b = ring_steps(busiest, shape, hw, hw.link(w), shape.heads, kv)
    hier_f, hier_b, _ = hierarchical_steps(shape, hw, w, L, kv)
    return dict(c_fwd=kernel_time(int(busiest[1]), shape, shape.heads, hw, False),
                c_bwd=kernel_time(int(busiest[1]), shape, shape.heads, hw, True), kv_mb=kv / 1e6,
                **{f"{k}_{link.name}": link.time(n) for link in (hw.intra, hw.inter)
                   for k, n in (("kv", kv), ("dkv", kv * ACC_BYTES // shape.e))},
                flat_fwd=sum(flat_f[g:2 * g]), flat_bwd=sum(flat_b[g:2 * g]), hier_fwd=hier_f[1], hier_bwd=hier_b[1])


def report_hierarchical(res, argv):
    cfg, shape, gpu, label = res["cfg"], res["shape"], res["gpu"], res["gpu_label"]
    g, nodes = cfg.gpus_per_node, cfg.nodes()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Flat vs hierarchical ring across nodes ({cfg.tag}): MODELLED", "",
             "**MODELLED**, nothing here is measured: outputs of the cost model in `benchmarks/scaling.py` (flat "
             "ring = `ring-zigzag`, hierarchical = `ring-hierarchical`; formulas and assumptions in its docstring). "
             f"GPU kernel throughput: {label}.", "",
             f"- machine that ran the model: {machine_name()}; {versions()}; {now}",
             "- command: `" + shlex.join(["python", "-m", "benchmarks.scaling", *argv]) + "`",
             f"- {g} GPUs per node over {NVLINK.name} {NVLINK.beta_bytes_per_s / 1e9:g} GB/s ({NVLINK.source}); "
             f"nodes over {INFINIBAND.name} {INFINIBAND.beta_bytes_per_s / 1e9:g} GB/s per GPU ({INFINIBAND.source}); "
             f"per-step overhead {gpu.overhead_s * 1e6:g} us (ASSUMED)",
             f"- shape B{shape.batch} H{shape.heads}/{shape.kv_heads} D{shape.headdim} {shape.dtype}, causal, zigzag "
             "layout, forward + backward; weak scaling (fixed tokens per GPU)",
             "- flat ring: with more than one node every one of its w steps waits on the InfiniBand hop; hierarchical: "
             f"the K/V blocks circulate on the {NVLINK.name} ring inside a node ({g} inner steps) while each GPU "
             "prefetches the next node's block over its own InfiniBand link, once per outer step",
             "", f"## Efficiency vs single-GPU kernel throughput (MODELLED; {label})", "",
             "efficiency = single-GPU kernel time of the same work / (w x modelled fwd+bwd time)", ""]
    head = ["nodes", "GPUs"] + [f"{L // 1024}K/GPU {k}" for L in cfg.hier_tokens_per_gpu for k in ("flat", "hier")]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for i, n in enumerate(nodes):
        lines.append(md_row([n, n * g] + [_fmt_eff(res["hier"][(L, s)][i]) for L in cfg.hier_tokens_per_gpu
                                          for s in ("ring-zigzag", "ring-hierarchical")]))
    lines += ["", f"## Step terms, ms (MODELLED; {label})", "",
              f"kernel = one off-diagonal ring step of the busiest GPU; hops = one message (K/V {shape.dtype}, dK/dV "
              f"fp32); last two columns: {g} flat steps vs one hierarchical outer step ({g} inner steps + the "
              f"overlapped InfiniBand prefetch), both at outer step 1 of 4 nodes, fwd / bwd", "",
              md_row(["tokens/GPU", "K/V MB", "kernel fwd / bwd", f"K/V hop {NVLINK.name} / {INFINIBAND.name}",
                      f"dK/dV hop {NVLINK.name} / {INFINIBAND.name}", f"flat, {g} steps fwd / bwd",
                      "hierarchical, 1 outer step fwd / bwd"]), md_row(["---"] * 7)]
    for L in cfg.hier_tokens_per_gpu:
        t = {k: v * 1e3 if k != "kv_mb" else v for k, v in _step_terms(shape, gpu, L).items()}
        lines.append(md_row([f"{L:,}", f"{t['kv_mb']:.1f}", f"{t['c_fwd']:.3f} / {t['c_bwd']:.3f}",
                             f"{t['kv_' + NVLINK.name]:.3f} / {t['kv_' + INFINIBAND.name]:.3f}",
                             f"{t['dkv_' + NVLINK.name]:.3f} / {t['dkv_' + INFINIBAND.name]:.3f}",
                             f"{t['flat_fwd']:.2f} / {t['flat_bwd']:.2f}", f"{t['hier_fwd']:.2f} / {t['hier_bwd']:.2f}"]))
    return "\n".join(lines) + "\n"


def plot_hierarchical(res, plt, path):
    cfg, nodes = res["cfg"], res["cfg"].nodes()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for i, L in enumerate(cfg.hier_tokens_per_gpu):
        flat, hier = (res["hier"][(L, s)] for s in ("ring-zigzag", "ring-hierarchical"))
        axes[0].plot(nodes, [r["efficiency"] for r in flat], color=f"C{i}", marker="o", ms=3, label=f"flat, {L // 1024}K/GPU")
        axes[0].plot(nodes, [r["efficiency"] for r in hier], color=f"C{i}", marker="s", ms=3, ls="--",
                     label=f"hierarchical, {L // 1024}K/GPU")
        axes[1].plot(nodes, [f["total"] / h["total"] for f, h in zip(flat, hier)], color=f"C{i}", marker="o", ms=3,
                     label=f"{L // 1024}K tokens/GPU")
    tag = f"MODELLED; {res['gpu_label']}"
    axes[0].set(title=f"efficiency vs single-GPU kernel throughput (weak scaling)\n{tag}", ylabel="efficiency (modelled)",
                ylim=(0, 1.05))
    axes[1].set(title=f"speedup of the hierarchical ring: flat fwd+bwd time / hierarchical\n{tag}",
                ylabel="speedup (modelled)", ylim=(0, None))
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(nodes, [str(n) for n in nodes])
        ax.set_xlabel(f"nodes ({cfg.gpus_per_node} GPUs each, {NVLINK.name} inside, {INFINIBAND.name} between)")
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(8)
    axes[0].legend(fontsize=7, ncol=2, loc="lower right")
    axes[1].legend(fontsize=7, loc="lower right")
    sh = res["shape"]
    fig.suptitle(f"flat vs hierarchical ring attention across nodes (MODELLED), B{sh.batch} H{sh.heads}/{sh.kv_heads} "
                 f"D{sh.headdim} {sh.dtype} causal, fwd+bwd", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _lines(ax, worlds, data, key, scale=1.0):
    for i, s in enumerate(STRATEGIES):
        pts = [(w, r[key] * scale) for w, r in zip(worlds, data[s]) if r is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, color=f"C{i}", ls="--" if s == "ring-striped" else "-", label=s)
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot(res, plt, path):
    cfg, worlds = res["cfg"], res["worlds"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    tag = f"MODELLED; {res['gpu_label']}"
    n_lo, n_hi = min(cfg.strong_seqlens), max(cfg.strong_seqlens)
    panels = [(f"weak scaling, {cfg.weak_block} tokens/rank", res["weak"]),
              (f"strong scaling, {n_lo:,} tokens", {s: res["strong"][(n_lo, s)] for s in STRATEGIES}),
              (f"strong scaling, {n_hi:,} tokens", {s: res["strong"][(n_hi, s)] for s in STRATEGIES})]
    for ax, (title, data) in zip(axes[0], panels):
        _lines(ax, worlds, data, "efficiency")
        ax.axvline(cfg.gpus_per_node, color="gray", ls=":", lw=0.8)
        ax.set(title=f"{title}\n{tag}", xlabel=f"world size (GPUs; {cfg.gpus_per_node}/node, dotted)",
               ylabel="efficiency (modelled)", ylim=(0, 1.05))
        ax.title.set_fontsize(8)
    ax = axes[1][0]
    _lines(ax, worlds, {s: res["strong"][(n_hi, s)] for s in STRATEGIES}, "memory", 1 / 2**30)
    ax.set_yscale("log")
    ax.set(title=f"memory per rank, attention tensors, {n_hi:,} tokens (MODELLED)", xlabel="world size",
           ylabel="GiB (modelled)")
    ax.title.set_fontsize(8)
    ax = axes[1][1]
    names = [NVLINK.name, INFINIBAND.name]
    ax.bar([i - 0.2 for i in range(2)], [res["hidden"][(n, False)] for n in names], width=0.4, label="forward")
    ax.bar([i + 0.2 for i in range(2)], [res["hidden"][(n, True)] for n in names], width=0.4, label="backward")
    ax.set_xticks(range(2), names)
    ax.set(title=f"tokens per rank above which the ring hides communication\n{tag}", ylabel="tokens (modelled)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    ax = axes[1][2]
    val = res["validation"]
    if val:
        xs = range(len(val))
        ax.bar([x - 0.27 for x in xs], [r["pred_ms"] for r in val], width=0.27, label="predicted (modelled)")
        ax.bar(list(xs), [r["pred_c_ms"] for r in val], width=0.27, label="predicted, contention-adjusted (modelled)")
        ax.bar([x + 0.27 for x in xs], [r["meas_ms"] for r in val], width=0.27, label="MEASURED")
        ax.set_xticks(list(xs), [f"world {r['world']}" + ("\n(oversubscribed)" if r["oversub"] > 1 else "") for r in val])
        ax.set(title=f"validation on this CPU (gloo): ring zigzag causal fwd+bwd, seqlen {cfg.validate_seqlen}",
               ylabel="ms")
        ax.set_ylim(0, 1.45 * max(max(r["pred_ms"], r["pred_c_ms"], r["meas_ms"]) for r in val))
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7, loc="upper left")
    else:
        ax.set_axis_off()
    fig.suptitle(f"{machine_name()}: cost model of sequence-parallel attention; GPU shape B{res['shape'].batch} "
                 f"H{res['shape'].heads}/{res['shape'].kv_heads} D{res['shape'].headdim} {res['shape'].dtype} causal",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, f in ScalingConfig.__dataclass_fields__.items():
        default = f.default_factory() if callable(f.default_factory) else f.default
        flag = "--" + name.replace("_", "-")
        if isinstance(default, list):
            p.add_argument(flag, type=int, nargs="*", default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    try:
        return ScalingConfig(**vars(p.parse_args(argv)))
    except ValueError as e:
        p.error(str(e))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg = parse_args(argv)
    res = run(cfg)
    write_result(cfg.out_dir, f"scaling_{cfg.tag}_hierarchical", report_hierarchical(res, argv),
                 lambda plt, path: plot_hierarchical(res, plt, path))
    return write_result(cfg.out_dir, f"scaling_{cfg.tag}", report(res, argv), lambda plt, path: plot(res, plt, path))


if __name__ == "__main__":
    main()
