"""Point-to-point bandwidth and latency of one ring exchange, and the alpha-beta model fitted to them.

Each rank of a spawned world (gloo on CPU, NCCL with one GPU per rank) runs exactly what a ring step
runs: ``dist_attn.comm.RingComm.send_recv`` (one ``batch_isend_irecv``: send n bytes to the next rank,
receive n bytes from the previous one) followed by ``wait``. For every message size n (powers of
``--factor`` from ``--min-bytes`` to ``--max-bytes``; default 1 KiB..64 MiB on gloo, 1 KiB..512 MiB on
NCCL), in each of ``--rounds`` sweeps over all sizes (so a burst of load from other processes hits every
size a little rather than one size entirely): ``--warmup`` untimed exchanges, ``dist.barrier()``, then
``--iters`` exchanges timed one by one (wall clock; on NCCL ``torch.cuda.synchronize`` closes each
one). The time of an exchange is the max over ranks (all_reduce MAX of the per-iteration times); the
report gives the median over all timed exchanges of a size (rounds x iters) and the bandwidth per
direction, n / time (GB/s = 1e9 bytes/s; every rank sends n and receives n at once).

The model: t(n) = alpha + n / beta. beta from a least-squares line through the large-message points
(the largest half of the sizes, at least 2), alpha from the smallest ``--fit-small`` points
(median of t - n / beta). Printed as "latency X us, bandwidth Y GB/s" and written with the device
description to <out-dir>/comm_<backend>.json (alpha_s, beta_bytes_per_s) for the scaling cost model,
next to comm_<backend>.md and, with matplotlib, comm_<backend>.png (bandwidth and time vs size, log-log).

gloo over loopback on a small shared CPU box is not NVLink or InfiniBand: those numbers calibrate the
CPU validation of the cost model only.

    python -m benchmarks.comm
    python -m benchmarks.comm --world-size 4 --iters 20
    python -m benchmarks.comm --backend nccl --world-size 8      # one rank per GPU, up to 512 MiB
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from benchmarks.common import RESULTS_DIR, machine_name, md_row, progress, versions, write_result
from launch.spawn import run_world

BACKENDS = ("gloo", "nccl")
DEFAULT_MAX_BYTES = {"gloo": 64 * 2**20, "nccl": 512 * 2**20}
PG_TIMEOUT_S = 120  # a rank stuck in an exchange fails after this long instead of hanging


@dataclass
class CommBenchConfig:
    """One benchmark run; each field is the CLI flag of the same name (underscores as dashes)."""
    backend: str = "gloo"
    world_size: int = 2
    min_bytes: int = 1024
    max_bytes: int | None = None       # None: 64 MiB on gloo, 512 MiB on nccl
    factor: int = 4                    # sizes min_bytes * factor**i up to max_bytes
    iters: int = 20                    # timed exchanges per size and round; the median is reported
    rounds: int = 3                    # sweeps over all sizes; a size's samples come from every round
    warmup: int = 5                    # untimed exchanges per size first
    fit_small: int = 3                 # smallest sizes that give alpha (median over them)
    timeout_s: float = 900.0           # the whole world is killed (an error) after this long
    out_dir: str = str(RESULTS_DIR)

    def __post_init__(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"{name}: {msg}; got {getattr(self, name)!r}")
        def is_int(x, low):
            return isinstance(x, int) and not isinstance(x, bool) and x >= low
        need(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
        if self.max_bytes is None:
            self.max_bytes = DEFAULT_MAX_BYTES[self.backend]
        need(is_int(self.world_size, 2), "world_size", "must be an int >= 2 (a ring needs two ranks)")
        need(is_int(self.min_bytes, 4) and self.min_bytes % 4 == 0, "min_bytes", "must be a multiple of 4, >= 4")
        need(is_int(self.max_bytes, self.min_bytes), "max_bytes", f"must be an int >= min_bytes ({self.min_bytes})")
        need(is_int(self.factor, 2), "factor", "must be an int >= 2")
        need(is_int(self.iters, 1), "iters", "must be an int >= 1")
        need(is_int(self.rounds, 1), "rounds", "must be an int >= 1")
        need(is_int(self.warmup, 0), "warmup", "must be an int >= 0")
        need(len(self.sizes()) >= 3, "max_bytes", "must leave at least 3 message sizes for the fit")
        need(is_int(self.fit_small, 1) and self.fit_small < len(self.sizes()), "fit_small",
             f"must be an int in [1, {len(self.sizes()) - 1}]")
        need(self.timeout_s > 0, "timeout_s", "must be > 0")
        if self.backend == "nccl":
            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            need(gpus >= self.world_size, "world_size", f"nccl needs one GPU per rank; {gpus} GPU(s) visible")

    def sizes(self):
        """Message sizes in bytes, min_bytes * factor**i <= max_bytes."""
        out, n = [], self.min_bytes
        while n <= self.max_bytes:
            out.append(n)
            n *= self.factor
        return out


def fit_alpha_beta(sizes, times, n_small=3, n_large=None):
    """(alpha seconds, beta bytes/s) of t = alpha + n / beta.

    beta: 1 / slope of the least-squares line t = a + b*n through the ``n_large`` largest sizes (default
    the largest half, at least 2); alpha: median of t - n / beta over the ``n_small`` smallest sizes, where
    latency dominates (the median shrugs off one slow point). Falls back to the best measured bandwidth
    if the slope is not positive and to the smallest time if alpha comes out non-positive (noise)."""
    pts = sorted(zip(sizes, times))
    if len(pts) < 2:
        raise ValueError("need at least 2 (size, time) points")
    n_large = max(2, len(pts) // 2) if n_large is None else n_large
    large = pts[-n_large:]
    mean_n = sum(n for n, _ in large) / len(large)
    mean_t = sum(t for _, t in large) / len(large)
    var = sum((n - mean_n) ** 2 for n, _ in large)
    slope = sum((n - mean_n) * (t - mean_t) for n, t in large) / var if var > 0 else 0.0
    beta = 1.0 / slope if slope > 0 else max(n / t for n, t in pts)
    small = pts[:n_small]
    alpha = statistics.median(t - n / beta for n, t in small)
    if alpha <= 0:
        alpha = min(t for _, t in pts)
    return alpha, beta


def _measure(rank, world_size, cfg):
    """(device description, {size: [seconds per timed exchange, max over ranks]})."""
    from dist_attn.comm import RingComm

    device = torch.device("cuda", rank) if cfg.backend == "nccl" else torch.device("cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    comm = RingComm()
    sizes = cfg.sizes()
    times = {n: [] for n in sizes}
    cases = [(r, n) for r in range(cfg.rounds) for n in sizes]
    for _, n in (progress(cases, f"ring exchange, {cfg.backend} x{world_size}") if rank == 0 else cases):
        send = torch.full((n // 4,), float(rank), dtype=torch.float32, device=device)
        recv = torch.empty_like(send)
        for _ in range(cfg.warmup):
            comm.send_recv(send, recv)
            comm.wait()
        sync()
        dist.barrier()
        elapsed = []
        for _ in range(cfg.iters):
            start = time.perf_counter()
            comm.send_recv(send, recv)
            comm.wait()
            sync()
            elapsed.append(time.perf_counter() - start)
        expected = float((rank - 1) % world_size)
        if not bool((recv == expected).all()):
            raise RuntimeError(f"rank {rank}: received the wrong data for {n} bytes")
        per_iter = torch.tensor(elapsed, dtype=torch.float64, device=device)
        dist.all_reduce(per_iter, op=dist.ReduceOp.MAX)
        times[n] += per_iter.cpu().tolist()
        del send, recv
    return machine_name(device), times


def _fmt_bytes(n):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def summarize(cfg, times):
    """Rows (size, median s, min s, GB/s per direction, model s) and the fit (alpha, beta)."""
    sizes = cfg.sizes()
    medians = [statistics.median(times[n]) for n in sizes]
    alpha, beta = fit_alpha_beta(sizes, medians, n_small=cfg.fit_small)
    rows = [(n, med, min(times[n]), n / med / 1e9, alpha + n / beta) for n, med in zip(sizes, medians)]
    return rows, alpha, beta


def report(cfg, device, rows, alpha, beta, argv, now, load):
    head = ["message", "bytes", "median time / exchange (us)", "min (us)", "bandwidth / direction (GB/s)",
            "model alpha + n/beta (us)", "model error"]
    lines = [f"# Ring exchange bandwidth and latency: {cfg.backend}, world {cfg.world_size}", "",
             f"**latency {alpha * 1e6:.1f} us, bandwidth {beta / 1e9:.3f} GB/s** "
             f"(alpha-beta fit, t(n) = alpha + n / beta; also in `comm_{cfg.backend}.json`)", "",
             f"- device: {device}; {cfg.world_size} ranks, 1 torch thread each; load average before the run "
             f"{load:.2f} (other processes on the box slow small messages down to scheduler time slices)",
             f"- {versions()}; {now}",
             "- command: `" + shlex.join(["python", "-m", "benchmarks.comm", *argv]) + "`",
             "- measured: `dist_attn.comm.RingComm.send_recv` + `wait` (one `batch_isend_irecv`: each rank "
             "sends n bytes to the next rank and receives n from the previous, as in one ring step); "
             f"{cfg.rounds} rounds over all sizes, each size per round: {cfg.warmup} warm-up exchanges, a barrier, "
             f"then {cfg.iters} exchanges timed one by one; an exchange's time is the max over ranks; the table "
             f"gives the median (and min) over the {cfg.rounds * cfg.iters} timed exchanges of a size; "
             "bandwidth per direction = n / median time (1 GB = 1e9 bytes)",
             f"- fit: beta = 1 / slope of a least-squares line through the largest {max(2, len(rows) // 2)} "
             f"sizes; alpha = median of t - n/beta over the smallest {cfg.fit_small}",
             "- caveat: gloo over loopback between processes on a shared 2-core box is not NVLink or "
             "InfiniBand; these numbers calibrate the CPU validation of the cost model only"
             if cfg.backend == "gloo" else
             "- NCCL between GPUs of one node; the path (NVLink or PCIe) is whatever the node has", "",
             md_row(head), md_row(["---"] * len(head))]
    for n, med, low, gbps, model in rows:
        lines.append(md_row([_fmt_bytes(n), f"{n:,}", f"{med * 1e6:,.1f}", f"{low * 1e6:,.1f}", f"{gbps:.3g}",
                             f"{model * 1e6:,.1f}", f"{(model - med) / med:+.0%}"]))
    return "\n".join(lines) + "\n"


def _plot(cfg, rows, alpha, beta):
    def draw(plt, path):
        sizes = [r[0] for r in rows]
        fine = [sizes[0] * (sizes[-1] / sizes[0]) ** (i / 200) for i in range(201)]
        fig, (ax_bw, ax_t) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax_bw.loglog(sizes, [r[3] for r in rows], "o-", label="measured (median)")
        ax_bw.loglog(fine, [n / (alpha + n / beta) / 1e9 for n in fine], "--",
                     label=f"model: {alpha * 1e6:.0f} us, {beta / 1e9:.2f} GB/s")
        ax_bw.set(xlabel="message size", ylabel="GB/s per direction", title="bandwidth")
        ax_t.loglog(sizes, [r[1] * 1e6 for r in rows], "o-", label="measured (median)")
        ax_t.loglog(fine, [(alpha + n / beta) * 1e6 for n in fine], "--", label="alpha + n / beta")
        ax_t.set(xlabel="message size", ylabel="us per exchange", title="time per exchange")
        for ax in (ax_bw, ax_t):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [_fmt_bytes(n).replace(" ", "\n") for n in sizes], fontsize=8)
            ax.tick_params(axis="x", which="minor", bottom=False)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        fig.suptitle(f"ring exchange (RingComm send_recv + wait), {cfg.backend}, world {cfg.world_size}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.comm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = CommBenchConfig.__dataclass_fields__
    parser.add_argument("--backend", choices=BACKENDS, default=defaults["backend"].default)
    for name in ("world_size", "min_bytes", "max_bytes", "factor", "iters", "rounds", "warmup", "fit_small"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=defaults[name].default)
    parser.add_argument("--timeout-s", type=float, default=defaults["timeout_s"].default)
    parser.add_argument("--out-dir", default=defaults["out_dir"].default)
    try:
        cfg = CommBenchConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    per_rank = run_world(cfg.world_size, _measure, cfg, timeout=cfg.timeout_s, pg_timeout_s=PG_TIMEOUT_S,
                         threads=1, backend=cfg.backend)
    device, times = per_rank[0]
    rows, alpha, beta = summarize(cfg, times)
    print(f"latency {alpha * 1e6:.1f} us, bandwidth {beta / 1e9:.3f} GB/s")
    md = write_result(cfg.out_dir, f"comm_{cfg.backend}", report(cfg, device, rows, alpha, beta, argv, now, load),
                      _plot(cfg, rows, alpha, beta))
    record = {"backend": cfg.backend, "world_size": cfg.world_size, "alpha_s": alpha, "beta_bytes_per_s": beta,
              "device": device, "versions": versions(), "date": now, "load_average_1min": load,
              "command": shlex.join(["python", "-m", "benchmarks.comm", *argv]),
              "config": {k: v for k, v in asdict(cfg).items() if k != "out_dir"},
              "sizes_bytes": [r[0] for r in rows], "median_s": [r[1] for r in rows],
              "bandwidth_gb_per_s": [r[3] for r in rows]}
    if not all(math.isfinite(x) and x > 0 for x in (alpha, beta)):
        raise RuntimeError(f"alpha-beta fit failed: alpha {alpha}, beta {beta}")
    json_path = Path(cfg.out_dir) / f"comm_{cfg.backend}.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {json_path}")
    return md


if __name__ == "__main__":
    main()
