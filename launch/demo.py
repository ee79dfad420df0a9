"""Kernel demo: runs the local attention kernel on random inputs, checks it against the float64
reference and prints a table of errors and times. Exits non-zero when a check fails.

    python -m launch.demo                       # defaults: CPU-sized, both backends where they run
    python -m launch.demo --seqlen 4096 --headdim 128 --dtype bfloat16   # on a GPU

On a machine without CUDA the Triton kernel runs under Triton's interpreter (TRITON_INTERPRET=1,
slow, so it gets a smaller sequence); the torch backend is the CPU default. The distributed main job
(ring attention under torchrun) replaces this demo once the ring exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before kernels imports triton

from kernels import attention_reference, flash_attn_func  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Max abs error vs float64 (shared/DESIGN.md) for float32; 16-bit inputs get a looser demo bound.
TOLERANCE = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 1e-1), torch.float16: (5e-3, 2e-2)}


@dataclasses.dataclass
class DemoConfig:
    batch: int = 1
    """Batch size."""
    seqlen: int = 1024
    """Sequence length for the torch and CUDA runs."""
    interpret_seqlen: int = 128
    """Sequence length for the Triton kernel under the CPU interpreter (slow)."""
    heads: int = 8
    """Query heads."""
    kv_heads: int = 2
    """Key/value heads (GQA when fewer than heads)."""
    headdim: int = 64
    """Head dimension (<= 256)."""
    dtype: str = "float32"
    """float32, bfloat16 or float16."""
    seed: int = 0

    def __post_init__(self):
        for name in ("batch", "seqlen", "interpret_seqlen", "heads", "kv_heads", "headdim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.headdim > 256:
            raise ValueError(f"headdim must be <= 256; got {self.headdim}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")


def parse_args(argv=None) -> DemoConfig:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field in dataclasses.fields(DemoConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    try:
        return DemoConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))  # one line on stderr, exit code 2


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def run_case(cfg: DemoConfig, backend: str, device: torch.device, seqlen: int, causal: bool):
    """One forward + backward against the float64 reference; returns a table row and pass/fail."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dtype = DTYPES[cfg.dtype]
    q = torch.randn(cfg.batch, seqlen, cfg.heads, cfg.headdim, generator=gen)
    k, v = (torch.randn(cfg.batch, seqlen, cfg.kv_heads, cfg.headdim, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    q, k, v = (x.to(device, dtype).requires_grad_() for x in (q, k, v))
    dout = dout.to(device, dtype)
    warm_up = flash_attn_func(q, k, v, causal=causal, backend=backend)  # compiles on CUDA, starts autograd threads
    torch.autograd.grad(warm_up, (q, k, v), dout)
    out, fwd_s = timed(lambda: flash_attn_func(q, k, v, causal=causal, backend=backend))
    grads, bwd_s = timed(lambda: torch.autograd.grad(out, (q, k, v), dout))

    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    ref_out, _ = attention_reference(q64, k64, v64, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, (q64, k64, v64), dout.cpu().double())
    errors = [(a.detach().cpu().double() - b).abs().max().item() for a, b in zip((out, *grads), (ref_out, *ref_grads))]
    fwd_tol, grad_tol = TOLERANCE[dtype]
    ok = errors[0] <= fwd_tol and max(errors[1:]) <= grad_tol
    name = f"{backend}{' (interpreter)' if backend == 'triton' and device.type == 'cpu' else ''}"
    row = [name, str(device), cfg.dtype, str(causal), str(seqlen), *(f"{e:.1e}" for e in errors),
           f"{fwd_s * 1e3:.1f}", f"{bwd_s * 1e3:.1f}", "ok" if ok else "FAIL"]
    return row, ok


def print_table(rows):
    header = ["backend", "device", "dtype", "causal", "seqlen", "err out", "err dq", "err dk", "err dv",
              "fwd ms", "bwd ms", "check"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def main(argv=None) -> int:
    cfg = parse_args(argv)
    cuda = torch.cuda.is_available()
    plan = [("torch", torch.device("cpu"), cfg.seqlen)]
    plan.append(("triton", torch.device("cuda"), cfg.seqlen) if cuda
                else ("triton", torch.device("cpu"), cfg.interpret_seqlen))
    print(f"dist-attn kernel demo: batch {cfg.batch}, heads {cfg.heads} (kv {cfg.kv_heads}), headdim {cfg.headdim}; "
          f"errors are max |ours - float64 reference|")
    rows, all_ok = [], True
    for backend, device, seqlen in plan:
        for causal in (False, True):
            row, ok = run_case(cfg, backend, device, seqlen, causal)
            rows.append(row)
            all_ok &= ok
    print_table(rows)
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
