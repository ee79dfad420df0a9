"""Simulated ring on ONE device: every rank's exact ring steps, run in turn, against one full-sequence kernel.

No process group. For a w-rank ring, rank r at step s holds the KV block of rank (r - s) mod w, and the
kernel calls of that step are exactly those of ``RingAttnFunc``: one per pair of
``dist_attn.ring.visible_pairs(layout, r, source, w, local_len, causal, window=None)`` (pairs that the
mask removes entirely are skipped), with the same slices, offsets and strides:

    flash_attn_forward(q[:, qs.rows], k[:, ks.rows], v[:, ks.rows], scale, causal,
                       qs.offset, ks.offset, qs.stride, ks.stride, None, accumulate=(acc_out, acc_lse))
    flash_attn_backward(dout[:, qs.rows], q[:, qs.rows], k[:, ks.rows], v[:, ks.rows], out[:, qs.rows],
                        lse[:, :, qs.rows], scale, causal, qs.offset, ks.offset, qs.stride, ks.stride, None,
                        accumulate=(dq, dk, dv))

where q/k/v/dout are the ranks' shards (``dist_attn.shard``) of one random full sequence, and out/lse of
the backward are the shards of one full-sequence forward (the global LSE, as the ring saves it). The
partial outputs are merged and the gradients accumulated by the kernels (``accumulate=``) as the ring does,
and the result is checked against the full-sequence kernel (column "max abs diff"), so the simulation is the
real computation. Only kernel calls are timed (with their fused merge, not communication): each call runs
``--reps`` times (after ``--warmup`` untimed runs) and its median counts; CUDA events with synchronisation
on GPU, ``time.perf_counter`` on CPU.

Reported per (world, layout, causal):
- ratio fwd / bwd / fwd+bwd: sum of all ranks' kernel times / one full-sequence kernel call (same kernel,
  same backend, out_dtype float32 in both). 1.00 = the ring adds no compute; target <= 1.05 at w = 8
  (non-causal).
- balance (time): max over ranks / mean over ranks of a rank's kernel time (fwd+bwd).
- balance (pairs): the same with each rank's exact count of visible (query, key) position pairs, i.e. its
  FLOPs (4*D per pair forward, for each head and batch element). Deterministic; target <= 1.05 for causal
  zigzag and striped. The pairs of all ranks always add up to the full sequence's (checked).
- critical path: sum over steps of the max over ranks of that step's kernel time (fwd + bwd), i.e. the
  compute time of a perfectly overlapped ring; "crit x w / single" = 1.00 is perfect w-way speed-up.

  python -m benchmarks.ring_sim                                   # CPU: small default, about a minute
  python -m benchmarks.ring_sim --worlds 1 2 4 8 --tokens-per-rank 4096 16384   # GPU: Llama-3-8B-like heads
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from benchmarks.common import RESULTS_DIR, machine_name, md_row, progress, versions, write_result
from dist_attn.layouts import LAYOUTS, chunks_per_rank, global_positions, shard
from dist_attn.ring import visible_pairs
from dist_attn.kernels import flash_attn_backward, flash_attn_forward
from dist_attn.kernels.positions import mask_band

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TARGET = 1.05

# defaults that depend on the device: (CPU, GPU)
_DEFAULTS = dict(worlds=([1, 2, 4, 8], [1, 2, 4, 8, 16, 32, 64]), heads=(8, 32), kv_heads=(2, 8),
                 headdim=(64, 128), dtype=("float32", "bfloat16"), backend=("torch", "triton"))


@dataclass
class RingSimConfig:
    """One run; each field is the CLI flag of the same name (underscores as dashes). None = device default:
    CPU: worlds 1 2 4 8, seqlen 2048 (total), heads 8/2, headdim 64, float32, backend torch;
    GPU: worlds 1..64, tokens_per_rank 4096, heads 32/8, headdim 128, bfloat16, backend triton."""
    device: str = "auto"                       # "auto" (cuda if available), "cpu", "cuda"
    worlds: list[int] | None = None
    layouts: list[str] = field(default_factory=lambda: list(LAYOUTS))
    causal: list[bool] = field(default_factory=lambda: [True, False])
    seqlen: int | None = None                  # total tokens, the same for every world ...
    tokens_per_rank: list[int] | None = None   # ... or tokens per rank (total = world * t), one row per value
    batch: int = 1
    heads: int | None = None
    kv_heads: int | None = None
    headdim: int | None = None
    dtype: str | None = None
    backend: str | None = None
    reps: int = 3                              # timed runs of every kernel call; the median counts
    warmup: int = 1                            # untimed runs of every kernel call first
    seed: int = 0
    out_dir: str = str(RESULTS_DIR)

    def __post_init__(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"{name}: {msg}; got {getattr(self, name)!r}")

        def ints(xs, low):
            return bool(xs) and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in xs)

        need(self.device in ("auto", "cpu", "cuda"), "device", "must be 'auto', 'cpu' or 'cuda'")
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        need(self.device == "cpu" or torch.cuda.is_available(), "device", "is 'cuda' but CUDA is not available")
        gpu = int(self.device == "cuda")
        for name, values in _DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, list(values[gpu]) if isinstance(values[gpu], list) else values[gpu])
        need(self.seqlen is None or self.tokens_per_rank is None, "seqlen",
             "give seqlen (total) or tokens_per_rank, not both")
        if self.seqlen is None and self.tokens_per_rank is None:
            if gpu:
                self.tokens_per_rank = [4096]
            else:
                self.seqlen = 2048
        need(ints(self.worlds, 1), "worlds", "must be a non-empty list of ints >= 1")
        need(bool(self.layouts) and set(self.layouts) <= set(LAYOUTS), "layouts", f"must be a subset of {LAYOUTS}")
        need(bool(self.causal) and all(isinstance(c, bool) for c in self.causal), "causal", "must be bools")
        need(self.seqlen is None or ints([self.seqlen], 1), "seqlen", "must be None or an int >= 1")
        need(self.tokens_per_rank is None or ints(self.tokens_per_rank, 1), "tokens_per_rank",
             "must be None or a non-empty list of ints >= 1")
        for name in ("batch", "heads", "kv_heads", "headdim", "reps", "warmup", "seed"):
            low = 0 if name in ("warmup", "seed") else 1
            need(ints([getattr(self, name)], low), name, f"must be an int >= {low}")
        need(self.heads % self.kv_heads == 0, "kv_heads", f"must divide heads ({self.heads})")
        need(self.headdim <= 256, "headdim", "must be <= 256")
        need(self.dtype in DTYPES, "dtype", f"must be one of {tuple(DTYPES)}")
        need(self.backend in ("torch", "triton"), "backend", "must be 'torch' or 'triton'")
        need(self.backend == "torch" or self.device == "cuda", "backend", "'triton' needs device 'cuda' here")
        for layout in self.layouts:
            for w in self.worlds:
                for total in self.totals(w):
                    multiple = chunks_per_rank(layout) * w
                    field_name = "seqlen" if self.seqlen is not None else "tokens_per_rank"
                    need(total % multiple == 0, field_name,
                         f"total seqlen {total} must be a multiple of {multiple} for layout {layout!r} with world {w}")

    def totals(self, world):
        """Total sequence lengths run at this world size."""
        return [self.seqlen] if self.seqlen is not None else [world * t for t in self.tokens_per_rank]

    def cases(self):
        return [(w, n, layout, causal) for w in self.worlds for n in self.totals(w)
                for layout in self.layouts for causal in self.causal]


def parse_args(argv) -> RingSimConfig:
    """CLI -> validated config; a bad value exits with the config's message (argparse style)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ring_sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RingSimConfig.__dataclass_fields__
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--worlds", type=int, nargs="+", default=None)
    p.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help=" ".join(LAYOUTS))
    p.add_argument("--causal", nargs="+", choices=["true", "false"], default=["true", "false"])
    p.add_argument("--seqlen", type=int, default=None, help="total tokens (CPU default 2048)")
    p.add_argument("--tokens-per-rank", type=int, nargs="+", default=None, help="GPU default 4096")
    for name in ("batch", "heads", "kv_heads", "headdim", "reps", "warmup", "seed"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default)
    p.add_argument("--dtype", default=None, help=" ".join(DTYPES))
    p.add_argument("--backend", default=None, help="torch or triton")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = vars(p.parse_args(argv))
    args["causal"] = [c == "true" for c in args["causal"]]
    try:
        return RingSimConfig(**args)
    except ValueError as e:
        p.error(str(e))


# ------------------------------------------------------------------------------------------ counting

def visible_count(q_seg, k_seg, causal, window=None):
    """Exact number of visible (query, key) position pairs of one kernel call (vectorised closed form per
    query row: the band ``qp - below <= kp <= qp + above`` over the key progression)."""
    qpos, kpos = q_seg.positions, k_seg.positions
    below, above = mask_band(causal, window, qpos, kpos)
    qp = qpos.offset + qpos.stride * torch.arange(qpos.length, dtype=torch.int64)
    start = torch.div(qp - below - kpos.offset + kpos.stride - 1, kpos.stride, rounding_mode="floor").clamp(min=0)
    end = (torch.div(qp + above - kpos.offset, kpos.stride, rounding_mode="floor") + 1).clamp(max=kpos.length)
    return int((end - start).clamp(min=0).sum())


def full_count(seqlen, causal):
    return seqlen * (seqlen + 1) // 2 if causal else seqlen * seqlen


# ------------------------------------------------------------------------------------------ simulating

class _Timer:
    """Median kernel time in ms of ``fn()`` over ``reps`` runs after ``warmup``; returns (ms, last result).
    ``accumulators``: tensors ``fn`` adds into (the ring's fused merge), restored before every run so that
    the last run leaves them as one call would."""

    def __init__(self, device, reps, warmup):
        self.cuda, self.reps, self.warmup = device.type == "cuda", reps, warmup

    def __call__(self, fn, accumulators=()):
        saved = [t.clone() for t in accumulators]

        def restore():
            for tensor, copy in zip(accumulators, saved):
                tensor.copy_(copy)

        for _ in range(self.warmup):
            fn()
            restore()
        times = []
        for i in range(self.reps):
            if i:
                restore()
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                result = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start = time.perf_counter()
                result = fn()
                times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times), result


def _inputs(batch, seqlen, heads, kv_heads, headdim, dtype, device, seed):
    """Full q, k, v, dout (batch, seqlen, heads, headdim)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seqlen, h, headdim, generator=gen).to(device=device, dtype=dtype)
            for h in (heads, kv_heads, kv_heads, heads)]


def _place(parts, layout, world, dim):
    """Inverse of ``shard``: every rank's local tensor (along ``dim``) back into global order."""
    local_len = parts[0].shape[dim]
    index = torch.cat([global_positions(layout, r, world, local_len, parts[0].device) for r in range(world)])
    stacked = torch.cat(parts, dim=dim)
    return torch.empty_like(stacked).index_copy_(dim, index, stacked)


def simulate(q, k, v, dout, causal, layout, world, softmax_scale=None, backend=None, timer=None, backward=True):
    """Runs every rank's ring steps on this device. Returns a dict: ``out`` (full sequence, global order,
    float32, merged across steps like the ring), ``dq, dk, dv`` (float32, global order; None without
    ``backward``), ``fwd_ms``/``bwd_ms`` (world x world: rank, step -> sum of that step's kernel times),
    ``pairs`` (world x world: visible position pairs), ``calls`` (kernel calls per pass) and the
    full-sequence ``single_out``/``single_lse`` whose global LSE the backward uses."""
    timer = timer or _Timer(q.device, 1, 0)
    seqlen, headdim = q.shape[1], q.shape[3]
    scale = headdim ** -0.5 if softmax_scale is None else softmax_scale
    local_len = seqlen // world
    single_out, single_lse = flash_attn_forward(q, k, v, scale, causal, backend=backend, out_dtype=torch.float32)
    out_q = single_out.to(q.dtype)  # the ring saves its output in q's dtype and its global LSE in float32
    qs, ks, vs = ([shard(x, layout, r, world, dim=1) for r in range(world)] for x in (q, k, v))
    if backward:
        ds, os_ = ([shard(x, layout, r, world, dim=1) for r in range(world)] for x in (dout, out_q))
        lses = [shard(single_lse, layout, r, world, dim=2) for r in range(world)]
    fwd_ms = [[0.0] * world for _ in range(world)]
    bwd_ms = [[0.0] * world for _ in range(world)]
    pairs = [[0] * world for _ in range(world)]
    outs, dqs, dks, dvs, calls = [], [], [], [], 0
    if backward:
        dks = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in ks]
        dvs = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in vs]
    for rank in range(world):
        q_r = qs[rank]
        out = torch.zeros(q_r.shape, dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[0], q.shape[2], local_len), float("-inf"), device=q.device)
        dq = torch.zeros(q_r.shape, dtype=torch.float32, device=q.device)
        for step in range(world):
            source = (rank - step) % world
            k_s, v_s = ks[source], vs[source]
            for q_seg, k_seg in visible_pairs(layout, rank, source, world, local_len, causal, None):
                rows, cols = q_seg.rows, k_seg.rows
                calls += 1
                pairs[rank][step] += visible_count(q_seg, k_seg, causal)
                acc = (out[:, rows], lse[:, :, rows])
                ms, _ = timer(lambda: flash_attn_forward(
                    q_r[:, rows], k_s[:, cols], v_s[:, cols], scale, causal, q_seg.offset, k_seg.offset,
                    q_seg.stride, k_seg.stride, None, backend=backend, accumulate=acc), acc)
                fwd_ms[rank][step] += ms
                if backward:
                    acc = (dq[:, rows], dks[source][:, cols], dvs[source][:, cols])
                    ms, _ = timer(lambda: flash_attn_backward(
                        ds[rank][:, rows], q_r[:, rows], k_s[:, cols], v_s[:, cols], os_[rank][:, rows],
                        lses[rank][:, :, rows], scale, causal, q_seg.offset, k_seg.offset, q_seg.stride,
                        k_seg.stride, None, backend=backend, accumulate=acc), acc)
                    bwd_ms[rank][step] += ms
        outs.append(out)
        dqs.append(dq)
    glob = (lambda parts: _place(parts, layout, world, 1))
    return dict(out=glob(outs), dq=glob(dqs) if backward else None, dk=glob(dks) if backward else None,
                dv=glob(dvs) if backward else None, fwd_ms=fwd_ms, bwd_ms=bwd_ms, pairs=pairs, calls=calls,
                single_out=single_out, single_lse=single_lse, scale=scale)


def simulate_forward(q, k, v, causal=False, layout="zigzag", world=2, softmax_scale=None, backend=None):
    """The simulated ring's forward output of all ranks, concatenated through the layout into global
    order (float32): equals attention over the full sequence."""
    return simulate(q, k, v, None, causal, layout, world, softmax_scale, backend, backward=False)["out"]


def single_times(q, k, v, dout, causal, scale, backend, timer):
    """(fwd ms, bwd ms, out, lse, dq, dk, dv) of one full-sequence kernel call each."""
    fwd, (out, lse) = timer(lambda: flash_attn_forward(q, k, v, scale, causal, backend=backend,
                                                      out_dtype=torch.float32))
    bwd, grads = timer(lambda: flash_attn_backward(dout, q, k, v, out.to(q.dtype), lse, scale, causal,
                                                   backend=backend))
    return fwd, bwd, out, lse, grads


def _ratio_max_mean(values):
    mean = sum(values) / len(values)
    return max(values) / mean if mean > 0 else float("nan")


def run(cfg):
    """One dict per case (world, seqlen, layout, causal) with times, ratios, balances and the check."""
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    timer = _Timer(device, cfg.reps, cfg.warmup)
    rows, inputs = [], {}
    for world, seqlen, layout, causal in progress(cfg.cases(), "ring simulation"):
        if seqlen not in inputs:
            inputs.clear()
            inputs[seqlen] = _inputs(cfg.batch, seqlen, cfg.heads, cfg.kv_heads, cfg.headdim, dtype, device, cfg.seed)
        q, k, v, dout = inputs[seqlen]
        scale = cfg.headdim ** -0.5
        # the baseline is timed again next to every case, so slow drifts of the machine hit both alike
        sfwd, sbwd, sout, _, (sdq, sdk, sdv) = single_times(q, k, v, dout, causal, scale, cfg.backend, timer)
        sim = simulate(q, k, v, dout, causal, layout, world, scale, cfg.backend, timer)
        err = max(float((a - b).abs().max()) for a, b in
                  ((sim["out"], sout), (sim["dq"], sdq), (sim["dk"], sdk), (sim["dv"], sdv)))
        fwd_ms, bwd_ms, pairs = sim["fwd_ms"], sim["bwd_ms"], sim["pairs"]
        fwd, bwd = sum(map(sum, fwd_ms)), sum(map(sum, bwd_ms))
        per_rank_ms = [sum(fwd_ms[r]) + sum(bwd_ms[r]) for r in range(world)]
        per_rank_pairs = [sum(pairs[r]) for r in range(world)]
        crit = sum(max(fwd_ms[r][s] + bwd_ms[r][s] for r in range(world)) for s in range(world))
        rows.append(dict(world=world, seqlen=seqlen, layout=layout, causal=causal, calls=sim["calls"],
                         single_fwd=sfwd, single_bwd=sbwd, fwd=fwd, bwd=bwd, ratio_fwd=fwd / sfwd,
                         ratio_bwd=bwd / sbwd, ratio=(fwd + bwd) / (sfwd + sbwd),
                         balance_time=_ratio_max_mean(per_rank_ms), balance_pairs=_ratio_max_mean(per_rank_pairs),
                         pairs_ok=sum(per_rank_pairs) == full_count(seqlen, causal), crit=crit,
                         crit_eff=crit * world / (sfwd + sbwd), err=err))
    return rows


# ------------------------------------------------------------------------------------------ reporting

HEADER = ["world", "seqlen", "tokens/rank", "layout", "causal", "kernel calls/pass", "single fwd ms", "ring fwd ms",
          "ratio fwd", "single bwd ms", "ring bwd ms", "ratio bwd", "ratio fwd+bwd", "balance time max/mean",
          "balance pairs max/mean", "pairs sum == full", "critical path ms", "crit x w / single", "max abs diff"]


def tag(device):
    return "cpu" if str(device) == "cpu" else re.sub(r"[^a-z0-9]+", "_", machine_name(device).lower()).strip("_")


def _targets(rows):
    lines = []
    for r in rows:
        if r["world"] == 8 and not r["causal"]:
            ok = "met" if r["ratio"] <= TARGET else "NOT met"
            lines.append(f"- w=8, {r['layout']}, non-causal, seqlen {r['seqlen']}: total compute ratio fwd+bwd "
                         f"{r['ratio']:.3f} (fwd {r['ratio_fwd']:.3f}, bwd {r['ratio_bwd']:.3f}), target <= {TARGET}: "
                         f"{ok} (measured)")
    for r in rows:
        if r["causal"] and r["layout"] in ("zigzag", "striped") and r["world"] > 1:
            ok = "met" if r["balance_pairs"] <= TARGET else "NOT met"
            lines.append(f"- w={r['world']}, {r['layout']}, causal, seqlen {r['seqlen']}: per-rank work max/mean "
                         f"{r['balance_pairs']:.4f} by exact pair count ({ok}; time-based {r['balance_time']:.3f})")
    return lines or ["- no row matches a target (needs world 8 non-causal, or causal zigzag/striped)"]


def report(cfg, rows, argv, load=None):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = torch.device(cfg.device)
    timing = "CUDA events with torch.cuda.synchronize" if device.type == "cuda" else "time.perf_counter"
    lines = ["# Simulated ring on one device: every rank's ring steps vs one full-sequence kernel", "",
             f"- device: {machine_name(device if device.type == 'cpu' else 0)}",
             f"- {versions()}",
             f"- date: {now}" + ("" if load is None else f"; 1-minute load average before the run: {load:.2f} "
                                 "(other work on this machine distorts the times)"),
             "- command: `" + shlex.join(["python", "-m", "benchmarks.ring_sim", *argv]) + "`",
             f"- {cfg.dtype}, batch {cfg.batch}, heads {cfg.heads}, kv heads {cfg.kv_heads}, headdim {cfg.headdim}, "
             f"backend {cfg.backend}; every kernel call timed {cfg.reps}x after {cfg.warmup} warmup ({timing}), "
             "median per call",
             "- kernel calls: exactly `RingAttnFunc`'s, from `dist_attn.ring.visible_pairs` (skipped pairs are not "
             "run); the backward uses the global LSE of one full-sequence forward", "",
             "Every number is measured on this device in this run, except the pair counts, which are exact. "
             "ratio = sum of all ranks' kernel times / one full-sequence kernel call (1.00: the ring's split adds "
             "no compute; above 1: smaller calls, partially masked tiles, launch overhead). balance = max over "
             "ranks / mean over ranks of per-rank work, by measured time and by exact visible (query, key) pairs "
             "(= FLOPs; deterministic). critical path = sum over steps of the slowest rank's step (fwd+bwd): the "
             "compute time of a ring whose communication is fully hidden; crit x w / single = 1.00 is a perfect "
             "w-way speed-up. Merges, gradient accumulation and communication are not timed. max abs diff = largest "
             "difference of the simulated out, dq, dk, dv from the full-sequence kernel's. The single-kernel "
             "baseline is timed again next to every row; world 1 with the contiguous or striped layout runs exactly "
             "the baseline's call, so its distance from 1.00 is this device's run-to-run noise"
             + (" (on a shared CPU it is large: judge time-based numbers against it; the pair counts are exact)."
                if device.type == "cpu" else "."), "",
             "## Targets", "", *_targets(rows), "", "## Results", "",
             md_row(HEADER), md_row(["---"] * len(HEADER))]
    for r in rows:
        lines.append(md_row([r["world"], r["seqlen"], r["seqlen"] // r["world"], r["layout"], r["causal"], r["calls"],
                             f"{r['single_fwd']:.2f}", f"{r['fwd']:.2f}", f"{r['ratio_fwd']:.3f}",
                             f"{r['single_bwd']:.2f}", f"{r['bwd']:.2f}", f"{r['ratio_bwd']:.3f}", f"{r['ratio']:.3f}",
                             f"{r['balance_time']:.3f}", f"{r['balance_pairs']:.4f}", r["pairs_ok"],
                             f"{r['crit']:.2f}", f"{r['crit_eff']:.3f}", f"{r['err']:.1e}"]))
    return "\n".join(lines) + "\n"


def plot(cfg, rows, plt, path):
    """Four panels against world size, one line per (layout, causal[, seqlen])."""
    panels = [("ratio", "total compute / single (fwd+bwd)"), ("balance_pairs", "work max/mean (exact pairs)"),
              ("balance_time", "work max/mean (time)"), ("crit_eff", "critical path x w / single")]
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.0))
    lines = list(dict.fromkeys((r["layout"], r["causal"], r["seqlen"] // r["world"] if cfg.seqlen is None else None)
                               for r in rows))
    for (key, title), ax in zip(panels, axes):
        for i, (layout, causal, tpr) in enumerate(lines):
            pts = [(r["world"], r[key]) for r in rows if (r["layout"], r["causal"]) == (layout, causal)
                   and (tpr is None or r["seqlen"] // r["world"] == tpr)]
            label = f"{layout} {'causal' if causal else 'non-causal'}" + (f" {tpr}/rank" if tpr else "")
            ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", ls="-" if causal else "--", label=label)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.axhline(TARGET, color="red", lw=0.8, ls=":", label=f"target {TARGET}" if key != "crit_eff" else None)
        ax.set_xscale("log", base=2)
        ax.set_xticks(cfg.worlds, [str(w) for w in cfg.worlds])
        ax.minorticks_off()
        ax.set(title=title, xlabel="world size (simulated ranks)")
        ax.set_ylim(bottom=min(0.9, ax.get_ylim()[0]))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    seq = f"seqlen {cfg.seqlen}" if cfg.seqlen else f"tokens/rank {cfg.tokens_per_rank}"
    fig.suptitle(f"{machine_name(torch.device(cfg.device) if cfg.device == 'cpu' else 0)}; {cfg.dtype} "
                 f"B{cfg.batch} H{cfg.heads}/{cfg.kv_heads} D{cfg.headdim} {seq}; backend {cfg.backend}; measured",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Runs the benchmark; returns the path of the markdown result."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg = parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = run(cfg)
    return write_result(cfg.out_dir, f"ring_sim_{tag(cfg.device)}", report(cfg, rows, argv, load),
                        lambda plt, path: plot(cfg, rows, plt, path))


if __name__ == "__main__":
    main()
