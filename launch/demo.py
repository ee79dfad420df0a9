"""The main job: ring attention across ranks, verified against exact attention, with a report.

    python -m launch.demo                               # spawns 4 gloo ranks on CPU, or one NCCL rank per GPU
    python -m launch.demo --world-size 2 --seqlen 8192 --no-causal --layout striped
    torchrun --nproc_per_node 8 -m launch.demo --seqlen 131072 --heads 32 --kv-heads 8 --headdim 128 --dtype bfloat16
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m launch.demo ...

Every rank builds the same seeded random q, k, v and output gradient, keeps its shard (``--layout``),
and runs ``ring_attention`` forward and backward: ``--warmup`` untimed and ``--iters`` timed iterations,
with a progress bar on rank 0. Outputs and gradients are then gathered and rank 0 checks them against
exact attention over the full sequence, computed in float64 chunk by chunk (memory O(seqlen x 256), not
O(seqlen^2)) from the same (rounded) inputs. It prints a table of errors, times, throughput, memory and
ring traffic; ``--json PATH`` writes the same numbers. Exit code: 0 verified, 1 check failed or a rank
failed, 2 bad configuration (one message from rank 0, before any process group exists).

A rank that fails (raises, dies, or waits longer than ``--timeout`` seconds for a peer) fails the run: the
others' ring transfers and collectives fail within that timeout, and the run exits with code 1 and one
line naming the rank that failed first and its error (``--fail-rank R`` injects such a fault). Spawned
ranks' tracebacks go to a log file the line names; under torchrun each rank prints one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dist_attn import gather, ring_attention, shard
from dist_attn.comm import traffic_meter
from dist_attn.layouts import LAYOUTS, chunks_per_rank
from dist_attn.topology import TOPOLOGIES
from dist_attn.kernels import torch_backend
from dist_attn.kernels.positions import Positions, mask_band
from launch.spawn import WorldFailed, caused_by_peer, inject_ring_fault, one_line, run_world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs error allowed. float32: docs/design.md's bounds (forward, gradients). 16-bit: a fraction of
# the largest reference value; a real bug gives errors of the order of the values themselves.
FP32_TOLERANCE = (2e-5, 1e-4)
LOW_PRECISION_RELATIVE_TOLERANCE = {torch.bfloat16: 2**-5, torch.float16: 2**-8}


@dataclasses.dataclass
class DemoConfig:
    batch: int = 1
    """Sequences per batch."""
    seqlen: int = 4096
    """Total tokens per sequence, split over the ranks."""
    heads: int = 8
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (GQA when fewer than heads; they travel the ring un-repeated)."""
    headdim: int = 64
    """Head dimension (<= 256)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    causal: bool = True
    """Causal mask over global positions."""
    layout: str = "zigzag"
    """contiguous, zigzag or striped (see dist_attn.layouts)."""
    topology: str = "auto"
    """auto, flat or hierarchical (see dist_attn.topology; emulate nodes with DIST_ATTN_LOCAL_WORLD_SIZE=g)."""
    iters: int = 5
    """Timed iterations (forward + backward each)."""
    warmup: int = 1
    """Untimed iterations first (compilation, autotuning, allocator)."""
    world_size: int = 0
    """Ranks to spawn when not under torchrun; 0: one per GPU, or 4 on CPU."""
    seed: int = 0
    """Seed of the random inputs."""
    json: str = ""
    """Also write the report as JSON to this path."""
    corrupt_rank: int = -1
    """Self-test hook: perturb this rank's output before the check (the check must then fail)."""
    fail_rank: int = -1
    """Self-test hook: this rank raises in the middle of its first ring forward (the run must fail)."""
    timeout: float = 1800.0
    """Process-group timeout in seconds: a rank waiting longer for a peer fails (the first iteration may
    autotune or compile for minutes)."""

    def __post_init__(self):
        for name in ("batch", "seqlen", "heads", "kv_heads", "headdim", "iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("warmup", "world_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds; got {self.timeout}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.headdim > 256:
            raise ValueError(f"headdim must be <= 256; got {self.headdim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}; got {self.layout!r}")
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}; got {self.topology!r}")

    def check_world(self, world_size):
        """What depends on the number of ranks; called before any process group is created."""
        multiple = world_size * chunks_per_rank(self.layout)
        if self.seqlen % multiple:
            raise ValueError(f"seqlen ({self.seqlen}) must be a multiple of {multiple} for layout={self.layout!r} "
                             f"on {world_size} ranks")
        for name in ("corrupt_rank", "fail_rank"):
            if getattr(self, name) >= world_size:
                raise ValueError(f"{name} must be < world size ({world_size}); got {getattr(self, name)}")


def parse_args(argv=None) -> DemoConfig:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(DemoConfig):
        flag = f"--{field.name.replace('_', '-')}"
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default)
    return DemoConfig(**vars(parser.parse_args(argv)))


def _time(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _peak_memory_bytes(device):
    """CUDA: peak allocated by torch; CPU: the process's peak resident set size (everything, not just tensors)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(cfg):
    """Full-sequence q, k, v, dout, identical on every rank (seeded), rounded to the run's dtype."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shapes = [(cfg.batch, cfg.seqlen, h, cfg.headdim) for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads, cfg.heads)]
    return [torch.randn(shape, generator=gen).to(DTYPES[cfg.dtype]) for shape in shapes]


def reference(q, k, v, dout, causal, device):
    """Exact attention and its gradients in float64, chunked (dist_attn.kernels.torch_backend), on the full sequence,
    computed on ``device`` (a GPU's float64 units make long sequences feasible)."""
    q, k, v, dout = (x.to(device, torch.float64) for x in (q, k, v, dout))
    positions = Positions(0, 1, q.shape[1])
    band = mask_band(causal, None, positions, positions)
    scale = q.shape[-1] ** -0.5
    out, lse = torch_backend.forward(q, k, v, scale, positions, positions, *band, torch.float64)
    return (out, *torch_backend.backward(dout, q, k, v, out, lse, scale, positions, positions, *band))


def run_rank(rank, world_size, cfg: DemoConfig):
    """Runs on every rank (process group initialised); returns the report on rank 0, None elsewhere."""
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if rank == cfg.fail_rank:
        inject_ring_fault("forward")
    full = _inputs(cfg)
    q, k, v = (shard(x, cfg.layout, rank, world_size).to(device).requires_grad_() for x in full[:3])
    dout = shard(full[3], cfg.layout, rank, world_size).to(device)

    def iteration():
        """One forward + backward: (output, forward s, backward s, {phase: sizes of the messages sent})."""
        q.grad = k.grad = v.grad = None
        dist.barrier()
        with traffic_meter() as sent:
            out, fwd_s = _time(lambda: ring_attention(q, k, v, causal=cfg.causal, layout=cfg.layout,
                                                          topology=cfg.topology), device)
            forward_messages = len(sent)
            _, bwd_s = _time(lambda: out.backward(dout), device)
        return out, fwd_s, bwd_s, {"forward": sent[:forward_messages], "backward": sent[forward_messages:]}

    for _ in range(cfg.warmup):
        iteration()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    steps = range(cfg.iters)
    if rank == 0:
        from tqdm import tqdm
        steps = tqdm(steps, desc=f"ring attention x{world_size} ({device.type})", unit="iter")
    for _ in steps:
        out, fwd_s, bwd_s, traffic = iteration()
        slowest = torch.tensor([fwd_s, bwd_s], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # an iteration lasts as long as its slowest rank
        times.append(slowest.tolist())
    peak = torch.tensor([_peak_memory_bytes(device)], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)

    out = out.detach()
    if rank == cfg.corrupt_rank:
        out = out + 1e-2
    gathered = [gather(t, layout=cfg.layout) for t in (out, q.grad, k.grad, v.grad)]
    if rank != 0:
        return None
    return _report(cfg, world_size, device, gathered, reference(*full, cfg.causal, device), times, traffic, peak.item())


def _report(cfg, world_size, device, results, exact, times, traffic, peak_bytes):
    dtype = DTYPES[cfg.dtype]
    checks = {}
    for name, got, ref in zip(("out", "dq", "dk", "dv"), results, exact):
        err = (got.double() - ref).abs()
        if dtype == torch.float32:
            tol = FP32_TOLERANCE[name != "out"]
        else:
            tol = LOW_PRECISION_RELATIVE_TOLERANCE[dtype] * ref.abs().max().item()
        finite = bool(torch.isfinite(got).all())
        checks[name] = {"max_err": err.max().item(), "mean_err": err.mean().item(), "tolerance": tol,
                        "ok": finite and err.max().item() <= tol}
    fwd_s = statistics.median(t[0] for t in times)
    bwd_s = statistics.median(t[1] for t in times)
    fwd_flops = 4 * cfg.batch * cfg.heads * cfg.seqlen ** 2 * cfg.headdim / (2 if cfg.causal else 1)
    return {
        "config": dataclasses.asdict(cfg), "world_size": world_size, "device": str(device),
        "check": checks, "ok": all(c["ok"] for c in checks.values()),
        "forward_ms": fwd_s * 1e3, "backward_ms": bwd_s * 1e3,
        "tokens_per_s": cfg.batch * cfg.seqlen / (fwd_s + bwd_s),
        "tflops_total": 3.5 * fwd_flops / (fwd_s + bwd_s) / 1e12,  # backward = 2.5x forward FLOPs
        "peak_memory_per_rank_bytes": peak_bytes,
        "ring_bytes_per_step": {phase: max(sizes, default=0) for phase, sizes in traffic.items()},  # largest message
        "ring_messages": {phase: len(sizes) for phase, sizes in traffic.items()},
        "ring_bytes_total": {phase: sum(sizes) for phase, sizes in traffic.items()},
    }


def print_report(report):
    cfg = report["config"]
    print(f"\nring attention on {report['world_size']} rank(s) ({report['device']}): batch {cfg['batch']}, "
          f"seqlen {cfg['seqlen']}, heads {cfg['heads']} (kv {cfg['kv_heads']}), headdim {cfg['headdim']}, "
          f"{cfg['dtype']}, {'causal' if cfg['causal'] else 'non-causal'}, layout {cfg['layout']}, "
          f"topology {cfg['topology']}")
    print(f"\n{'':>4}  {'max err':>9}  {'mean err':>9}  {'tolerance':>9}  check")
    for name, c in report["check"].items():
        print(f"{name:>4}  {c['max_err']:9.2e}  {c['mean_err']:9.2e}  {c['tolerance']:9.2e}  "
              f"{'ok' if c['ok'] else 'FAIL'}")
    step, messages = report["ring_bytes_per_step"], report["ring_messages"]
    rows = [("forward / iteration", f"{report['forward_ms']:.2f} ms"),
            ("backward / iteration", f"{report['backward_ms']:.2f} ms"),
            ("tokens / s", f"{report['tokens_per_s']:,.0f}"),
            ("TFLOP/s (all ranks)", f"{report['tflops_total']:.4f}"),
            ("TFLOP/s per rank", f"{report['tflops_total'] / report['world_size']:.4f}"),
            ("peak memory / rank", f"{report['peak_memory_per_rank_bytes'] / 2**20:,.1f} MiB"
             + (" (CPU: peak RSS)" if report["device"] == "cpu" else "")),
            ("ring bytes / step (fwd)", f"{step['forward']:,} B x {messages['forward']} messages"),
            ("ring bytes / step (bwd)", f"{step['backward']:,} B x {messages['backward']} messages")]
    print()
    for label, value in rows:
        print(f"{label:>24}  {value}")
    print("\nverified: outputs and gradients match exact attention" if report["ok"] else
          "\nVERIFICATION FAILED: see the table above")


def _fail(message, rank):
    """A configuration error: one line from rank 0, exit code 2 on every rank."""
    if rank == 0:
        print(f"launch.demo: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _write_log(error):
    """Writes a WorldFailed's full message (every failed rank's traceback) to a file; returns its path."""
    with tempfile.NamedTemporaryFile("w", prefix="launch.demo-", suffix=".log", delete=False) as log:
        log.write(str(error))
    return log.name


def main(argv=None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    try:
        cfg = parse_args(argv)
    except ValueError as error:
        _fail(error, rank)
    under_torchrun = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    cuda = torch.cuda.is_available()
    world_size = int(os.environ["WORLD_SIZE"]) if under_torchrun else (cfg.world_size or
                                                                         (torch.cuda.device_count() if cuda else 4))
    try:
        cfg.check_world(world_size)
    except ValueError as error:
        _fail(error, rank)

    if under_torchrun:
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.timeout))
        try:
            report = run_rank(rank, world_size, cfg)
            ok = torch.tensor([report["ok"] if rank == 0 else 0], device="cuda" if cuda else "cpu")
            dist.broadcast(ok, src=0)  # every rank exits with the verdict
            passed = bool(ok.item())
        except Exception as error:  # one line per rank, not a traceback from every rank
            stopped = "stopped, as a peer failed" if caused_by_peer(error) else "failed"
            print(f"launch.demo: error: rank {rank} {stopped}: {one_line(error)}", file=sys.stderr)
            return 1
        finally:
            dist.destroy_process_group()
    else:
        threads = max(1, (os.cpu_count() or 1) // world_size)
        try:
            report = run_world(world_size, run_rank, cfg, timeout=max(3600.0, 2 * cfg.timeout),
                               pg_timeout_s=cfg.timeout, threads=threads, backend="nccl" if cuda else "gloo")[0]
        except WorldFailed as error:
            print(f"launch.demo: error: {error.summary} (every rank's traceback: {_write_log(error)})",
                  file=sys.stderr)
            return 1
        passed = report["ok"]
    if rank == 0:
        print_report(report)
        if cfg.json:
            with open(cfg.json, "w") as f:
                json.dump(report, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
