"""Kernel benchmark: our flash attention against torch SDPA's backends and FlexAttention, in one run.

For every shape (headdim, causal, seqlen) and every provider it measures the median time of
  fwd      out = attn(q, k, v)                      (autograd on, as in training)
  bwd      out.backward(dout, retain_graph=True)    (on a graph built once)
  fwd+bwd  attn(q, k, v).backward(dout)
and turns it into TFLOP/s with the flash-attn convention (matmul FLOPs only, nheads = query heads):
  fwd     = 4 * batch * nheads * seqlen_q * seqlen_k * headdim     (QK^T and PV), halved if causal
  bwd     = 2.5 * fwd   (five matmuls instead of two: recomputed QK^T, dV, dP, dQ, dK)
  fwd+bwd = 3.5 * fwd
Providers: ours (`flash_attn_func`: backend "triton" on CUDA, the chunked "torch" path on CPU; Triton
on CPU only with --cpu-triton and TRITON_INTERPRET=1, very slow), torch SDPA with each backend forced
(flash, cudnn, efficient, math; layout (batch, heads, seq, dim)) and compiled FlexAttention (CUDA
only); ``--providers`` keeps only the named ones (default: all). A provider that cannot run a case is
reported "n/a" with its reason, one out of memory "oom".
Timing: `warmup` untimed calls, then `reps` timed ones (CUDA events on CUDA, perf_counter on CPU);
the median is reported. Writes <out-dir>/kernel_<tag>.md and, with matplotlib, kernel_<tag>.png.

  GPU:        python -m benchmarks.kernel
  CPU smoke:  python -m benchmarks.kernel --device cpu --seqlens 256 --headdims 64 --batch 1 --heads 2 --reps 2
"""

from __future__ import annotations

import argparse
import datetime
import re
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, machine_name, md_row, progress, seqlen_axis, versions, write_result

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


@dataclass
class BenchConfig:
    """One benchmark run; each field is the CLI flag of the same name (underscores as dashes)."""
    device: str | None = None      # "cpu", "cuda" or "cuda:N"; None: cuda if available
    dtype: str | None = None       # bf16 | fp16 | fp32; None: bf16 on CUDA, fp32 on CPU
    batch: int = 4
    heads: int = 32                # query heads
    kv_heads: int | None = None    # key/value heads (GQA when fewer); None: = heads
    headdims: list[int] = field(default_factory=lambda: [64, 128])
    seqlens: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    causal: list[bool] = field(default_factory=lambda: [False, True])
    modes: list[str] = field(default_factory=lambda: list(MODES))
    reps: int = 20                 # timed calls per measurement; the median is reported
    warmup: int = 3                # untimed calls first: autotuning, torch.compile, allocator
    out_dir: str = str(RESULTS_DIR)
    tag: str | None = None         # files are kernel_<tag>.md/.png; None: slug of the device name
    cpu_triton: bool = False       # also time our Triton kernels on CPU (needs TRITON_INTERPRET=1)
    providers: list[str] | None = None  # only these providers (names of PROVIDER_NAMES); None: all

    def __post_init__(self):
        def need(ok, name, msg):
            if not ok:
                raise ValueError(f"{name}: {msg}; got {getattr(self, name)!r}")
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        need(re.fullmatch(r"cpu|cuda(:\d+)?", self.device), "device", "must be 'cpu', 'cuda' or 'cuda:N'")
        need(self.device == "cpu" or torch.cuda.is_available(), "device", "CUDA is not available here")
        self.dtype = self.dtype or ("fp32" if self.device == "cpu" else "bf16")
        need(self.dtype in DTYPES, "dtype", f"must be one of {sorted(DTYPES)}")
        self.kv_heads = self.heads if self.kv_heads is None else self.kv_heads
        for name in ("batch", "heads", "kv_heads", "reps", "warmup"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= (name != "warmup"), name,
                 "must be an int >= " + ("0" if name == "warmup" else "1"))
        need(self.heads % self.kv_heads == 0, "kv_heads", f"must divide heads ({self.heads})")
        need(self.headdims and all(isinstance(d, int) and 1 <= d <= 256 for d in self.headdims),
             "headdims", "must be a non-empty list of ints in 1..256")
        need(self.seqlens and all(isinstance(s, int) and s >= 1 for s in self.seqlens),
             "seqlens", "must be a non-empty list of ints >= 1")
        need(self.causal and all(isinstance(c, bool) for c in self.causal), "causal", "must be bools")
        need(self.modes and set(self.modes) <= set(MODES), "modes", f"must be a subset of {MODES}")
        need(self.providers is None or (self.providers and set(self.providers) <= set(PROVIDER_NAMES)),
             "providers", f"must be a non-empty subset of {PROVIDER_NAMES}")
        if self.tag is None:
            name = "cpu" if self.device == "cpu" else torch.cuda.get_device_name(self.device)
            self.tag = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        need(re.fullmatch(r"[A-Za-z0-9._-]+", self.tag), "tag", "must use only letters, digits, '.', '_', '-'")


def parse_args(argv) -> BenchConfig:
    """CLI -> validated config; a bad value exits with the config's message (argparse style)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = BenchConfig.__dataclass_fields__
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--dtype", help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    for name in ("batch", "heads", "kv_heads", "reps", "warmup"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=d[name].default)
    p.add_argument("--headdims", type=int, nargs="+", default=d["headdims"].default_factory())
    p.add_argument("--seqlens", type=int, nargs="+", default=d["seqlens"].default_factory())
    p.add_argument("--causal", nargs="+", choices=["false", "true"], default=["false", "true"])
    p.add_argument("--modes", nargs="+", default=list(MODES), help=" ".join(MODES))
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--tag", help="result files are kernel_<tag>.md/.png (default: from the device name)")
    p.add_argument("--cpu-triton", action="store_true", help="also our Triton kernels on CPU (TRITON_INTERPRET=1)")
    p.add_argument("--providers", nargs="+", help="only these (default: all): " + " ".join(PROVIDER_NAMES))
    args = vars(p.parse_args(argv))
    args["causal"] = [c == "true" for c in args["causal"]]
    try:
        return BenchConfig(**args)
    except ValueError as e:
        p.error(str(e))


# ------------------------------------------------------------------------------------------ providers
# A provider takes (q, k, v, causal) in the flash layout (batch, seqlen, heads, dim), makes its own
# leaf tensors in its native layout (outside the timed region) and returns a call that gives `out`.

def _ours(backend):
    def make(q, k, v, causal):
        from dist_attn.kernels import flash_attn_func
        q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
        return lambda: flash_attn_func(q, k, v, causal=causal, backend=backend)
    return make


def _sdpa(backend_name):
    def make(q, k, v, causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)
        q, k, v = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # (B, H, L, D)
        gqa = k.shape[1] != q.shape[1]

        def call():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        return call
    return make


def _flex(q, k, v, causal):
    if q.device.type != "cuda":
        raise RuntimeError("FlexAttention is benchmarked on CUDA only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)  # 1 per shape
    flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))  # (B, H, L, D)
    mask = None
    if causal:
        mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, q.shape[2], k.shape[2], device=q.device)
    gqa = k.shape[1] != q.shape[1]
    return lambda: flex(q, k, v, block_mask=mask, enable_gqa=gqa)


_SDPA_BACKENDS = ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
PROVIDER_NAMES = ("ours-triton", "ours-torch", *(f"sdpa-{b.split('_')[0].lower()}" for b in _SDPA_BACKENDS), "flex")


def providers(cfg):
    """name -> provider (only those of ``cfg.providers`` when given); names starting with "ours" are
    compared against all the others."""
    ours = {"ours-triton": _ours("triton")} if cfg.device != "cpu" else {"ours-torch": _ours("torch")}
    if cfg.device == "cpu" and cfg.cpu_triton:
        ours["ours-triton"] = _ours("triton")
    sdpa = {f"sdpa-{b.split('_')[0].lower()}": _sdpa(b) for b in _SDPA_BACKENDS}
    every = {**ours, **sdpa, "flex": _flex}
    return every if cfg.providers is None else {name: make for name, make in every.items() if name in cfg.providers}


# ------------------------------------------------------------------------------------------ measuring

def _time_ms(fn, cfg):
    """Median ms of `reps` calls after `warmup` untimed ones; on CUDA, events around each call."""
    for _ in range(cfg.warmup):
        fn()
    times = []
    if cfg.device == "cpu":
        for _ in range(cfg.reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize(cfg.device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(cfg.reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(cfg.device)
    return statistics.median(s.elapsed_time(e) for s, e in events)


def measure(make, q, k, v, causal, cfg):
    """mode -> milliseconds, or "oom" / "n/a: <reason>" for the modes that could not be measured."""
    result = {}
    # SDPA says why a backend refused in warnings (C++ warnings carry the file of the Python caller: this one)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            call = make(q, k, v, causal)
            if "fwd" in cfg.modes:
                result["fwd"] = _time_ms(call, cfg)
            if "bwd" in cfg.modes or "fwd+bwd" in cfg.modes:
                out = call()
                dout = torch.randn_like(out)
                if "bwd" in cfg.modes:
                    result["bwd"] = _time_ms(lambda: out.backward(dout, retain_graph=True), cfg)
                del out
                if "fwd+bwd" in cfg.modes:
                    result["fwd+bwd"] = _time_ms(lambda: call().backward(dout), cfg)
        except torch.OutOfMemoryError:
            result.update({m: "oom" for m in cfg.modes if m not in result})
        except Exception as e:  # a baseline missing on this device or build must not end the run
            why = [f"{type(e).__name__}: {str(e).strip()}"]
            why += [str(w.message).strip() for w in caught if w.filename == __file__]
            reason = "; ".join(dict.fromkeys(line.splitlines()[0][:160] for line in why if line))
            result.update({m: f"n/a: {reason}" for m in cfg.modes if m not in result})
    return result


def flops(cfg, headdim, seqlen, causal, mode):
    return 4 * cfg.batch * cfg.heads * seqlen * seqlen * headdim / (2 if causal else 1) * FLOP_FACTOR[mode]


def run(cfg):
    """(headdim, causal, seqlen, provider) -> measure(...) for every case."""
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    provs = providers(cfg)
    if not provs:
        raise ValueError(f"providers: none of {cfg.providers} runs on device {cfg.device!r}")
    shapes = [(d, c, s) for d in cfg.headdims for c in cfg.causal for s in cfg.seqlens]
    results, inputs = {}, {}
    for shape, name in progress([(shape, name) for shape in shapes for name in provs], "kernel benchmark"):
        if shape not in inputs:  # same inputs for every provider of a shape; one shape in memory
            inputs.clear()
            headdim, _, seqlen = shape
            gen = torch.Generator(device).manual_seed(0)
            inputs[shape] = [torch.randn(cfg.batch, seqlen, h, headdim, device=device, dtype=dtype, generator=gen)
                             for h in (cfg.heads, cfg.kv_heads, cfg.kv_heads)]
        results[(*shape, name)] = measure(provs[name], *inputs[shape], shape[1], cfg)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


# ------------------------------------------------------------------------------------------ reporting

def _tflops(cfg, key, mode, results):
    """TFLOP/s of one case, None where it was not measured; key = (headdim, causal, seqlen, provider)."""
    ms = results[key].get(mode)
    return flops(cfg, key[0], key[2], key[1], mode) / ms / 1e9 if isinstance(ms, float) else None


def _fmt(x):
    return "n/a" if x is None else f"{x:.4g}"


def _device_name(cfg):
    name = machine_name(cfg.device)
    return f"{name} ({torch.get_num_threads()} threads)" if cfg.device == "cpu" else name


def report(cfg, results, argv):
    """The markdown result: setup, all measurements, ours vs the best baseline, why cases are missing."""
    names = list(dict.fromkeys(key[3] for key in results))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# Kernel benchmark: {cfg.tag}", "", f"- device: {_device_name(cfg)}",
             f"- dtype {cfg.dtype}, batch {cfg.batch}, heads {cfg.heads}, kv heads {cfg.kv_heads}; "
             f"median of {cfg.reps} reps after {cfg.warmup} warmup calls",
             f"- {versions()}",
             f"- date: {now}", f"- command: `python -m benchmarks.kernel {shlex.join(argv)}`",
             "- FLOPs: fwd = 4 * batch * heads * seqlen^2 * headdim (halved if causal); bwd = 2.5 x fwd; "
             "fwd+bwd = 3.5 x fwd", "", "## Time (ms) and TFLOP/s", ""]
    head = ["headdim", "causal", "seqlen", "provider"] + [f"{m} {u}" for m in cfg.modes for u in ("ms", "TFLOP/s")]
    lines += [md_row(head), md_row(["---"] * len(head))]
    for key, res in results.items():
        cells = list(key)
        for mode in cfg.modes:
            ms = res[mode]
            cells += [f"{ms:.3f}", _fmt(_tflops(cfg, key, mode, results))] if isinstance(ms, float) \
                else [ms.split(":")[0]] * 2
        lines.append(md_row(cells))
    head = ["headdim", "causal", "seqlen", "mode", "ours", "TFLOP/s", "best baseline", "TFLOP/s", "ratio"]
    lines += ["", "## Ours vs the best baseline of this run (TFLOP/s ratio; > 1: ours is faster)", "",
              md_row(head), md_row(["---"] * len(head))]
    for shape in dict.fromkeys(key[:3] for key in results):
        for mode in cfg.modes:
            base = [(_tflops(cfg, (*shape, n), mode, results), n) for n in names if not n.startswith("ours")]
            best, best_name = max((b for b in base if b[0] is not None), default=(None, "n/a"))
            for ours in (n for n in names if n.startswith("ours")):
                mine = _tflops(cfg, (*shape, ours), mode, results)
                ratio = mine / best if mine is not None and best is not None else None
                lines.append(md_row([*shape, mode, ours, _fmt(mine), best_name, _fmt(best), _fmt(ratio)]))
    reasons = sorted({(k[3], r) for k, res in results.items() for r in res.values() if isinstance(r, str)})
    if reasons:
        lines += ["", "## Not measured", ""] + [f"- {name}: {reason}" for name, reason in reasons]
    return "\n".join(lines) + "\n"


def plot(cfg, results, plt, path):
    """TFLOP/s vs seqlen: one panel per (headdim, causal, mode), one line (fixed colour) per provider."""
    names = list(dict.fromkeys(key[3] for key in results))
    panels = [(d, c) for d in cfg.headdims for c in cfg.causal]
    fig, axes = plt.subplots(len(panels), len(cfg.modes), squeeze=False,
                             figsize=(4.2 * len(cfg.modes), 3.0 * len(panels) + 0.8))
    handles = {}
    for (headdim, causal), ax_row in zip(panels, axes):
        for mode, ax in zip(cfg.modes, ax_row):
            for i, name in enumerate(names):
                pts = [(s, _tflops(cfg, (headdim, causal, s, name), mode, results)) for s in cfg.seqlens]
                pts = [p for p in pts if p[1] is not None]
                if pts:
                    handles[name], = ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=name)
            seqlen_axis(ax, cfg.seqlens, f"headdim {headdim}, {'causal' if causal else 'non-causal'}, {mode}",
                        "TFLOP/s")
    fig.suptitle(f"{_device_name(cfg)}, {cfg.dtype}, batch {cfg.batch}, heads {cfg.heads}/{cfg.kv_heads}")
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=max(len(handles), 1), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Runs the benchmark; returns the path of the markdown result."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    cfg = parse_args(argv)
    results = run(cfg)
    return write_result(cfg.out_dir, f"kernel_{cfg.tag}", report(cfg, results, argv),
                        lambda plt, path: plot(cfg, results, plt, path))


if __name__ == "__main__":
    main()
