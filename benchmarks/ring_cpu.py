"""Ring benchmark on CPU: `ring_attention` over real gloo process groups against the single-process kernel.

For every world size w one gloo world is spawned (torch.multiprocessing); each rank takes its shard
(`dist_attn.shard`) of the same random full sequence and runs `ring_attention` forward and backward
(backend "torch", fp32) with `threads_per_rank` = max(1, os.cpu_count() // w) intra-op threads unless
--threads-per-rank is given. Each iteration: `dist.barrier()`, wall clock of the forward, wall clock of
the backward; an iteration's time is the max over ranks (all_reduce MAX); after `warmup` untimed
iterations the median of `iters` timed ones is reported. Baseline in the same run, in the parent process
with all cores: `dist_attn.kernels.flash_attn_func(q, k, v, causal, backend="torch")` on the full sequence, same
protocol; the ratios are ring ms / single ms (fwd, bwd, and fwd+bwd = sum of the two medians).

Bytes: every message a worker sends through `RingComm` is counted (`dist_attn.comm.traffic_meter`).
With L = seqlen / w tokens per rank and e = bytes per element (4 for fp32), each rank sends per iteration
  forward:  (w-1) KV messages of 2*B*L*Hk*D*e bytes           (K and V packed in one buffer)
  backward: (w-1) KV messages of 2*B*L*Hk*D*e bytes  +  w dK/dV messages of 2*B*L*Hk*D*4 bytes
            (the float32 accumulators travel w hops to come home).
The report says "measured == formula" only when every rank's every timed iteration sent exactly these
messages (same count, same sizes).

Meant for CPU boxes like CI's 2 cores: worlds with w * threads > cores are oversubscribed, and gloo over
loopback is not NCCL. The numbers check overheads and communication volume, not GPU scaling.
Writes <out-dir>/ring_cpu.md and, with matplotlib, ring_cpu.png.

  python -m benchmarks.ring_cpu
  python -m benchmarks.ring_cpu --worlds 1 2 --seqlens 256 --iters 2 --warmup 0 \\
      --layouts zigzag striped --causal true false
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from benchmarks.common import RESULTS_DIR, machine_name, md_row, progress, seqlen_axis, versions, write_result
from dist_attn.layouts import LAYOUTS, chunks_per_rank
from launch.spawn import run_world

ELEM_BYTES = 4          # fp32 inputs
ACC_BYTES = 4           # fp32 dK/dV accumulators
PG_TIMEOUT_S = 120      # a rank stuck in a collective fails after this long instead of hanging


@dataclass
class RingBenchConfig:
    """One benchmark run; each field is the CLI flag of the same name (underscores as dashes)."""
    worlds: list[int] = field(default_factory=lambda: [1, 2, 4])
    seqlens: list[int] = field(default_factory=lambda: [1024, 2048, 4096])   # total (global) tokens
    layouts: list[str] = field(default_factory=lambda: ["zigzag"])
    causal: list[bool] = field(default_factory=lambda: [True])
    batch: int = 1
    heads: int = 8
    kv_heads: int = 2
    headdim: int = 64
    iters: int = 10                      # timed iterations; the median is reported
    warmup: int = 2                      # untimed iterations first
    threads_per_rank: int | None = None  # None: max(1, os.cpu_count() // world)
    timeout_s: float = 900.0             # a world (all its cases) that takes longer is killed: an error
    out_dir: str = str(RESULTS_DIR)

    def __post_init__(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"{name}: {msg}; got {getattr(self, name)!r}")
        def ints(xs, low):
            return bool(xs) and all(isinstance(x, int) and not isinstance(x, bool) and x >= low for x in xs)
        need(ints(self.worlds, 1), "worlds", "must be a non-empty list of ints >= 1")
        need(ints(self.seqlens, 1), "seqlens", "must be a non-empty list of ints >= 1")
        need(self.layouts and set(self.layouts) <= set(LAYOUTS), "layouts", f"must be a subset of {LAYOUTS}")
        need(self.causal and all(isinstance(c, bool) for c in self.causal), "causal", "must be bools")
        for name in ("batch", "heads", "kv_heads", "headdim", "iters", "warmup"):
            need(ints([getattr(self, name)], int(name != "warmup")), name,
                 "must be an int >= " + ("0" if name == "warmup" else "1"))
        need(self.heads % self.kv_heads == 0, "kv_heads", f"must divide heads ({self.heads})")
        need(self.headdim <= 256, "headdim", "must be <= 256")
        need(self.threads_per_rank is None or ints([self.threads_per_rank], 1), "threads_per_rank",
             "must be None or an int >= 1")
        need(self.timeout_s > 0, "timeout_s", "must be > 0")
        for layout in self.layouts:
            for w in self.worlds:
                multiple = chunks_per_rank(layout) * w
                bad = [s for s in self.seqlens if s % multiple]
                need(not bad, "seqlens", f"must be multiples of {multiple} for layout {layout!r} with world {w} "
                                         f"({'2 * world' if layout == 'zigzag' else 'world'}); {bad} are not")

    def threads(self, world):
        return self.threads_per_rank or max(1, (os.cpu_count() or 1) // world)

    def cases(self):
        return [(layout, causal, seqlen) for layout in self.layouts for causal in self.causal
                for seqlen in self.seqlens]


def parse_args(argv) -> RingBenchConfig:
    """CLI -> validated config; a bad value exits with the config's message (argparse style)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ring_cpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = RingBenchConfig.__dataclass_fields__
    for name in ("worlds", "seqlens"):
        p.add_argument("--" + name, type=int, nargs="+", default=d[name].default_factory())
    p.add_argument("--layouts", nargs="+", default=["zigzag"], help=" ".join(LAYOUTS))
    p.add_argument("--causal", nargs="+", choices=["false", "true"], default=["true"])
    for name in ("batch", "heads", "kv_heads", "headdim", "iters", "warmup", "threads_per_rank"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default)
    p.add_argument("--timeout-s", type=float, default=d["timeout_s"].default)
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = vars(p.parse_args(argv))
    args["causal"] = [c == "true" for c in args["causal"]]
    try:
        return RingBenchConfig(**args)
    except ValueError as e:
        p.error(str(e))


# ------------------------------------------------------------------------------------------ measuring

def _inputs(cfg, seqlen, seed=0):
    """Full q, k, v, dout (batch, seqlen, heads, headdim), fp32; the same on every process."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(cfg.batch, seqlen, h, cfg.headdim, generator=gen)
            for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads)]


def _ring_worker(rank, world, cfg):
    """All cases on this rank: per case the max-over-ranks fwd/bwd ms of every timed iteration and the
    byte sizes of this rank's sends, per timed iteration, in forward and backward."""
    from dist_attn import ring_attention, shard
    from dist_attn.comm import traffic_meter

    out = []
    for layout, causal, seqlen in cfg.cases():
        q, k, v, dout = (shard(x, layout, rank, world).requires_grad_(i < 3)
                         for i, x in enumerate(_inputs(cfg, seqlen)))
        times, fwd_sends, bwd_sends = [], [], []
        for it in range(cfg.warmup + cfg.iters):
            q.grad = k.grad = v.grad = None
            dist.barrier()
            with traffic_meter() as sent:
                start = time.perf_counter()
                o = ring_attention(q, k, v, causal=causal, layout=layout, backend="torch")
                mid = time.perf_counter()
                n_fwd = len(sent)
                o.backward(dout)
                end = time.perf_counter()
            t = torch.tensor([mid - start, end - mid], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if it >= cfg.warmup:
                times.append((t * 1e3).tolist())
                fwd_sends.append(sent[:n_fwd])
                bwd_sends.append(sent[n_fwd:])
        out.append(dict(case=(layout, causal, seqlen), times=times, fwd_sends=fwd_sends, bwd_sends=bwd_sends))
    return out


def single_baseline(cfg, seqlen, causal):
    """Median (fwd ms, bwd ms) of flash_attn_func on the full sequence in this process (all cores)."""
    from dist_attn.kernels import flash_attn_func
    q, k, v, dout = _inputs(cfg, seqlen)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    times = []
    for it in range(cfg.warmup + cfg.iters):
        q.grad = k.grad = v.grad = None
        start = time.perf_counter()
        o = flash_attn_func(q, k, v, causal=causal, backend="torch")
        mid = time.perf_counter()
        o.backward(dout)
        end = time.perf_counter()
        if it >= cfg.warmup:
            times.append(((mid - start) * 1e3, (end - mid) * 1e3))
    return tuple(statistics.median(t[i] for t in times) for i in (0, 1))


def formula(cfg, world, seqlen):
    """(forward, backward) messages one rank sends per iteration, from the docstring, as runs of
    (count, bytes each): forward [(w-1, KV)], backward [(w-1, KV), (w, dK/dV accumulator)]."""
    kv = 2 * cfg.batch * (seqlen // world) * cfg.kv_heads * cfg.headdim  # elements of one K+V (or dK+dV) block
    if world == 1:
        return [], []
    return [(world - 1, kv * ELEM_BYTES)], [(world - 1, kv * ELEM_BYTES), (world, kv * ACC_BYTES)]


def _flat(runs):
    return sorted(size for count, size in runs for _ in range(count))


def run(cfg):
    """Rows: one dict per (world, layout, causal, seqlen) with times, ratios and the bytes check."""
    single, ring = {}, {}
    jobs = [("single", key) for key in dict.fromkeys((c, s) for _, c, s in cfg.cases())] + \
           [("world", w) for w in cfg.worlds]
    threads_before = torch.get_num_threads()
    for kind, what in progress(jobs, "ring benchmark"):
        if kind == "single":
            torch.set_num_threads(os.cpu_count() or 1)
            try:
                single[what] = single_baseline(cfg, what[1], what[0])
            finally:
                torch.set_num_threads(threads_before)
        else:
            ring[what] = run_world(what, _ring_worker, cfg, timeout=cfg.timeout_s, pg_timeout_s=PG_TIMEOUT_S,
                                   threads=cfg.threads(what))
    rows = []
    for world in cfg.worlds:
        per_rank = ring[world]
        for i, (layout, causal, seqlen) in enumerate(cfg.cases()):
            fwd_f, bwd_f = formula(cfg, world, seqlen)
            cases = [r[i] for r in per_rank]
            ok = all(sorted(s) == _flat(fwd_f) for c in cases for s in c["fwd_sends"]) and \
                all(sorted(s) == _flat(bwd_f) for c in cases for s in c["bwd_sends"])
            fwd = statistics.median(t[0] for t in cases[0]["times"])
            bwd = statistics.median(t[1] for t in cases[0]["times"])
            sfwd, sbwd = single[(causal, seqlen)]
            rows.append(dict(world=world, layout=layout, causal=causal, seqlen=seqlen, threads=cfg.threads(world),
                             fwd=fwd, bwd=bwd, single_fwd=sfwd, single_bwd=sbwd, ratio_fwd=fwd / sfwd,
                             ratio_bwd=bwd / sbwd, ratio=(fwd + bwd) / (sfwd + sbwd),
                             fwd_sent=cases[0]["fwd_sends"][0], bwd_sent=cases[0]["bwd_sends"][0],
                             fwd_formula=fwd_f, bwd_formula=bwd_f, bytes_ok=ok))
    return rows


# ------------------------------------------------------------------------------------------ reporting

def _sends(sizes):
    return f"{sum(sizes)} ({len(sizes)} msgs)"


def _terms(runs):
    """[(3, a), (4, b)] -> "3 x a + 4 x b = total"."""
    return " + ".join(f"{n} x {s}" for n, s in runs) + f" = {sum(n * s for n, s in runs)}" if runs else "0"


HEADER = ["world", "layout", "causal", "seqlen", "threads/rank", "fwd ms", "bwd ms", "single fwd ms",
          "single bwd ms", "ratio fwd", "ratio bwd", "ratio fwd+bwd", "fwd bytes/rank measured", "fwd formula",
          "bwd bytes/rank measured", "bwd formula", "bytes"]


def report(cfg, rows, argv, load):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count() or 1
    over = [w for w in cfg.worlds if w * cfg.threads(w) > cores]
    all_ok = all(r["bytes_ok"] for r in rows)
    lines = ["# Ring attention on CPU (gloo): ring vs single-process kernel", "",
             f"- machine: {machine_name()}",
             f"- {versions()}",
             f"- date: {now}; 1-minute load average before the run: {load:.2f} (other work on these "
             "cores distorts the times)",
             "- command: `" + shlex.join(["python", "-m", "benchmarks.ring_cpu", *argv]) + "`",
             f"- fp32, batch {cfg.batch}, heads {cfg.heads}, kv heads {cfg.kv_heads}, headdim {cfg.headdim}, "
             f"backend torch; median of {cfg.iters} iterations after {cfg.warmup} warmup; ring time of an "
             f"iteration = max over ranks; single = `flash_attn_func` on the full sequence in one process with "
             f"{cores} threads",
             "- ratio = ring ms / single ms; fwd+bwd = (fwd + bwd medians) / (single fwd + single bwd)",
             "- bytes per rank per iteration, L = seqlen / world: forward (w-1) x 2*B*L*Hk*D*4; backward "
             "(w-1) x 2*B*L*Hk*D*4 (KV) + w x 2*B*L*Hk*D*4 (fp32 dK/dV accumulators)",
             f"- bytes check: {'measured == formula for every row' if all_ok else 'MISMATCH in some rows'} "
             "(every rank, every timed iteration: same message count and sizes)", "", "## Results", "",
             md_row(HEADER), md_row(["---"] * len(HEADER))]
    for r in rows:
        lines.append(md_row([r["world"], r["layout"], r["causal"], r["seqlen"], r["threads"],
                           *(f"{r[k]:.2f}" for k in ("fwd", "bwd", "single_fwd", "single_bwd")),
                           *(f"{r[k]:.3f}" for k in ("ratio_fwd", "ratio_bwd", "ratio")),
                           _sends(r["fwd_sent"]), _terms(r["fwd_formula"]), _sends(r["bwd_sent"]),
                           _terms(r["bwd_formula"]), "measured == formula" if r["bytes_ok"] else "MISMATCH"]))
    def spread(world):
        ratios = [r["ratio"] for r in rows if r["world"] == world]
        return f"{min(ratios):.2f}-{max(ratios):.2f}"
    lines += ["", "## What the numbers mean", "",
              f"This is a {cores}-core CPU with gloo over loopback, not GPUs with NCCL: the numbers check the ring's "
              "overheads and its communication volume, not multi-GPU scaling, where every rank has its own device. "
              "Here all ranks share the same cores, so a ratio of 1 means the ring costs nothing extra; above 1 is "
              "its overhead (processes, gloo copies, smaller kernel calls, merging partial results) plus contention. "
              + "Ratio fwd+bwd by world: " + ", ".join(f"{w}: {spread(w)}" for w in cfg.worlds) + ". "
              + ("World 1 runs the same work with the same threads as the single kernel (the ring has no peer), so "
                 "its distance from 1 is this machine's run-to-run noise. " if 1 in cfg.worlds else "")
              + (f"World(s) {over} run more threads than there are cores (oversubscribed), so their times include "
                 "contention between ranks. " if over else "")
              + "Bytes are exact: every message of every rank in every timed iteration is counted and compared "
              "with the formula, and that volume is what carries over to GPUs."]
    return "\n".join(lines) + "\n"


def plot(cfg, rows, plt, path):
    """ratio fwd+bwd vs seqlen, one line per world size, one panel per (layout, causal)."""
    panels = list(dict.fromkeys((r["layout"], r["causal"]) for r in rows))
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(5.0 * len(panels), 3.8))
    for (layout, causal), ax in zip(panels, axes[0]):
        for i, world in enumerate(cfg.worlds):
            pts = [(r["seqlen"], r["ratio"]) for r in rows
                   if (r["world"], r["layout"], r["causal"]) == (world, layout, causal)]
            ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"world {world} ({cfg.threads(world)} thr/rank)")
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        seqlen_axis(ax, cfg.seqlens, f"{layout}, {'causal' if causal else 'non-causal'}",
                    "ring / single time (fwd+bwd)")
        ax.legend(fontsize=8)
    fig.suptitle(f"{machine_name()}; gloo; fp32 B{cfg.batch} H{cfg.heads}/{cfg.kv_heads} D{cfg.headdim}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Runs the benchmark; returns the path of the markdown result."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg = parse_args(argv)
    load = os.getloadavg()[0]
    rows = run(cfg)
    return write_result(cfg.out_dir, "ring_cpu", report(cfg, rows, argv, load),
                        lambda plt, path: plot(cfg, rows, plt, path))


if __name__ == "__main__":
    main()
