"""Pieces every benchmark shares: where it ran, progress, markdown rows, plots, writing results."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_name(device="cpu"):
    """GPU name for CUDA devices; CPU model and core count otherwise."""
    if str(device) != "cpu":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    return f"CPU {found.group(1).strip() if found else platform.machine()}, {os.cpu_count()} cores"


def versions():
    import triton
    return f"torch {torch.__version__}, triton {triton.__version__}, python {platform.python_version()}"


def md_row(cells):
    return "| " + " | ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in cells) + " |"


def progress(items, desc):
    """tqdm over ``items`` when installed, else one printed line per item."""
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, unit="case")
    except ImportError:
        return (print(f"[{i + 1}/{len(items)}] {item}", flush=True) or item for i, item in enumerate(items))


def seqlen_axis(ax, seqlens, title, ylabel):
    """A log2 sequence-length x axis with the measured lengths as ticks, y from 0, light grid."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(seqlens, [str(s) for s in seqlens])
    ax.minorticks_off()
    ax.set(title=title, xlabel="seqlen", ylabel=ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)


def write_result(out_dir, stem, text, plot):
    """Prints the markdown, writes <out_dir>/<stem>.md and, when matplotlib is installed, the PNG that
    ``plot(plt, path)`` draws. Returns the markdown path."""
    print(text)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{stem}.md"
    md.write_text(text)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {md}; matplotlib is not installed: no plot (pip install matplotlib)")
        return md
    png = out_dir / f"{stem}.png"
    plot(plt, png)
    print(f"wrote {md} and {png}")
    return md
