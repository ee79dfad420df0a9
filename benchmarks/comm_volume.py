"""Communication volume per rank of one attention layer: ring, Ulysses and hybrid Ulysses x ring.

For a world of w ranks it runs one forward and backward of each strategy over real gloo process
groups, counts every byte each rank sends (``dist_attn.comm.traffic_meter``: ring messages and
all-to-all traffic) and prints it next to the formula. With L = seqlen / w tokens per rank, e bytes per
element, H query heads, Hk K/V heads (Hk' = max(Hk, u) under Ulysses: K/V heads are replicated up to
one per Ulysses rank) and head dim D, one rank sends:

  ring (r = w)           fwd (r-1) * 2*B*L*Hk*D*e              bwd (r-1) * 2*B*L*Hk*D*e + r * 2*B*L*Hk*D*4
  Ulysses (u = w)        fwd (u-1)/u * B*L*D*e * (2H + 2Hk')   bwd the same (dout in; dq, dk, dv back)
  hybrid (u x r = w)     the Ulysses terms with u, plus the ring terms with Hk' in place of Hk

(the ring's backward sends float32 dK/dV accumulators, hence the 4). The volume is exact, the same on
CPU and GPU; times are not measured here (benchmarks/ring_cpu.py does that for the ring).

Sliding windows (``--windows``, causal, left window sizes): the ring sends only the blocks some rank
needs (``dist_attn.ring.ring_plan``: a hops forward, b backward), so with M = 2*B*L*Hk*D one rank sends
fwd (a+b) * M*e and bwd (a+b) * M*e + (a+1 [a > 0] + b) * M*4, against the full ring's (w-1, 0).

    python -m benchmarks.comm_volume
    python -m benchmarks.comm_volume --world-size 8 --seqlen 65536 --heads 32 --kv-heads 8 --headdim 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
from dataclasses import dataclass

import torch

from benchmarks.common import RESULTS_DIR, md_row, versions, write_result
from launch.spawn import run_world

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class VolumeConfig:
    world_size: int = 4
    seqlen: int = 4096
    heads: int = 8
    kv_heads: int = 2
    headdim: int = 64
    batch: int = 1
    dtype: str = "float32"
    windows: str = "256,1024,2048"
    out_dir: str = str(RESULTS_DIR)

    def __post_init__(self):
        if self.world_size < 2 or self.world_size & (self.world_size - 1):
            raise ValueError(f"world_size must be a power of two >= 2; got {self.world_size}")
        if self.seqlen % (2 * self.world_size):
            raise ValueError(f"seqlen ({self.seqlen}) must be a multiple of 2 * world_size ({2 * self.world_size})")
        if self.heads % self.world_size or self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by world_size ({self.world_size}) and "
                             f"kv_heads ({self.kv_heads})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        try:
            sizes = self.window_sizes()
        except ValueError:
            sizes = None
        if sizes is None or any(size < 0 for size in sizes):
            raise ValueError(f"windows must be comma-separated ints >= 0 (left window sizes); got {self.windows!r}")

    def window_sizes(self):
        return [int(size) for size in self.windows.split(",") if size.strip()]

    def strategies(self):
        """name -> (Ulysses degree, ring degree)."""
        w = self.world_size
        return {"ring": (1, w), "ulysses": (w, 1), "hybrid": (2, w // 2)} if w > 2 else {"ring": (1, 2), "ulysses": (2, 1)}


def formula(cfg, ulysses, ring):
    """(forward, backward) bytes one rank sends, from the module docstring."""
    e = torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    tokens = cfg.batch * cfg.seqlen // cfg.world_size * cfg.headdim  # B*L*D
    kv_heads = max(cfg.kv_heads, ulysses) if ulysses > 1 else cfg.kv_heads
    all_to_all = (ulysses - 1) * tokens * e * (2 * cfg.heads + 2 * kv_heads) // ulysses
    ring_kv = (ring - 1) * 2 * tokens * kv_heads * e
    ring_dkv = ring * 2 * tokens * kv_heads * 4 if ring > 1 else 0
    return all_to_all + ring_kv, all_to_all + ring_kv + ring_dkv


def window_formula(cfg, layout, left):
    """(forward, backward) bytes one rank sends for a causal window ``(left, 0)`` (module docstring)."""
    from dist_attn.ring import ring_plan

    fwd_hops, bwd_hops = ring_plan(layout, cfg.world_size, cfg.seqlen // cfg.world_size, True,
                                   None if left is None else (left, 0))
    block = 2 * cfg.batch * cfg.seqlen // cfg.world_size * cfg.kv_heads * cfg.headdim
    kv = (fwd_hops + bwd_hops) * block * torch.empty((), dtype=DTYPES[cfg.dtype]).element_size()
    chain = ((fwd_hops + 1 if fwd_hops else 0) + bwd_hops) * block * 4
    return (fwd_hops, bwd_hops), kv, kv + chain


WINDOW_LAYOUTS = ("contiguous", "zigzag")


def _measure_windows(rank, world_size, cfg):
    """{(layout, left): (forward bytes, backward bytes)} of the plain ring with causal windows."""
    from dist_attn import ring_attention
    from dist_attn.comm import traffic_meter

    sent, local = {}, cfg.seqlen // world_size
    for layout in WINDOW_LAYOUTS:
        for left in [None, *cfg.window_sizes()]:
            q = torch.randn(cfg.batch, local, cfg.heads, cfg.headdim, dtype=DTYPES[cfg.dtype], requires_grad=True)
            k, v = (torch.randn(cfg.batch, local, cfg.kv_heads, cfg.headdim, dtype=DTYPES[cfg.dtype],
                                requires_grad=True) for _ in range(2))
            with traffic_meter() as forward:
                out = ring_attention(q, k, v, causal=True, layout=layout, window=None if left is None else (left, 0),
                                     check_peers=False)
            with traffic_meter() as backward:
                out.backward(torch.randn_like(out))
            sent[(layout, left)] = (sum(forward), sum(backward))
    return sent


def _measure(rank, world_size, cfg):
    """{strategy: (forward bytes, backward bytes)} sent by this rank."""
    from dist_attn import usp_attention
    from dist_attn.comm import traffic_meter
    from dist_attn.groups import sequence_parallel_groups

    dtype, sent = DTYPES[cfg.dtype], {}
    for name, (u, r) in cfg.strategies().items():
        groups = sequence_parallel_groups(u, r)
        local = cfg.seqlen // world_size
        q = torch.randn(cfg.batch, local, cfg.heads, cfg.headdim, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(cfg.batch, local, cfg.kv_heads, cfg.headdim, dtype=dtype, requires_grad=True)
                for _ in range(2))
        with traffic_meter() as forward:
            out = usp_attention(q, k, v, causal=True, layout="zigzag", ulysses_group=groups.ulysses_group,
                                ring_group=groups.ring_group)
        with traffic_meter() as backward:
            out.backward(torch.randn_like(out))
        sent[name] = (sum(forward), sum(backward))
    sent["windows"] = _measure_windows(rank, world_size, cfg)
    return sent


def report(cfg, per_rank, argv):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = ["strategy", "ulysses x ring", "fwd bytes/rank (max over ranks)", "fwd formula",
            "bwd bytes/rank (max over ranks)", "bwd formula", "check"]
    lines = [f"# Communication volume of one attention layer, world {cfg.world_size}", "",
             "- measured: every byte each rank sends, counted by `dist_attn.comm.traffic_meter` (gloo, CPU; "
             "the volume does not depend on the device)",
             f"- batch {cfg.batch}, seqlen {cfg.seqlen}, heads {cfg.heads}, kv heads {cfg.kv_heads}, headdim "
             f"{cfg.headdim}, {cfg.dtype}, causal zigzag", f"- {versions()}; {now}",
             "- command: `" + shlex.join(["python", "-m", "benchmarks.comm_volume", *argv]) + "`",
             "- formulas: see the module docstring of benchmarks/comm_volume.py", "",
             md_row(head), md_row(["---"] * len(head))]
    for name, (u, r) in cfg.strategies().items():
        fwd = max(sent[name][0] for sent in per_rank)
        bwd = max(sent[name][1] for sent in per_rank)
        f_fwd, f_bwd = formula(cfg, u, r)
        lines.append(md_row([name, f"{u} x {r}", f"{fwd:,}", f"{f_fwd:,}", f"{bwd:,}", f"{f_bwd:,}",
                             "measured == formula" if (fwd, bwd) == (f_fwd, f_bwd) else "MISMATCH"]))
    lines += ["", f"## Causal sliding window, ring only (per-rank block {cfg.seqlen // cfg.world_size} tokens)", "",
              "Blocks that no rank's window reaches are not sent (`dist_attn.ring.ring_plan`).", ""]
    head = ["layout", "window (left, 0)", "hops fwd/back", "fwd bytes/rank", "bwd bytes/rank", "vs full ring",
            "check"]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for layout in WINDOW_LAYOUTS:
        full = max(sum(sent["windows"][(layout, None)]) for sent in per_rank)
        for left in [None, *cfg.window_sizes()]:
            fwd = max(sent["windows"][(layout, left)][0] for sent in per_rank)
            bwd = max(sent["windows"][(layout, left)][1] for sent in per_rank)
            hops, f_fwd, f_bwd = window_formula(cfg, layout, left)
            lines.append(md_row([layout, "none" if left is None else left, f"{hops[0]}/{hops[1]}", f"{fwd:,}",
                                 f"{bwd:,}", f"{(fwd + bwd) / full:.1%}",
                                 "measured == formula" if (fwd, bwd) == (f_fwd, f_bwd) else "MISMATCH"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.comm_volume", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in vars(VolumeConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    try:
        cfg = VolumeConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))
    per_rank = run_world(cfg.world_size, _measure, cfg, timeout=900)
    return write_result(cfg.out_dir, f"comm_volume_w{cfg.world_size}", report(cfg, per_rank, argv), _plot(cfg, per_rank))


def _plot(cfg, per_rank):
    def draw(plt, path):
        names = list(cfg.strategies())
        fwd = [max(s[n][0] for s in per_rank) / 2**20 for n in names]
        bwd = [max(s[n][1] for s in per_rank) / 2**20 for n in names]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        ax.bar([i - 0.2 for i in range(len(names))], fwd, width=0.4, label="forward")
        ax.bar([i + 0.2 for i in range(len(names))], bwd, width=0.4, label="backward")
        ax.set_xticks(range(len(names)), [f"{n} ({u}x{r})" for n, (u, r) in cfg.strategies().items()])
        ax.set(ylabel="MiB sent per rank (measured)", title=f"one attention layer, world {cfg.world_size}, "
               f"seqlen {cfg.seqlen}, H {cfg.heads}/{cfg.kv_heads}, {cfg.dtype}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


if __name__ == "__main__":
    main()
