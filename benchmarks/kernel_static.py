"""Static performance check of the Triton kernels for Hopper (sm_90a), on a machine without a GPU.

The kernels are compiled exactly as a launch on an H100/H200 would compile them: the real launchers of
``dist_attn.kernels.triton_attention`` are called with CPU tensors of a real shape, and a stand-in driver that
reports an sm_90 device turns every ``kernel[grid](...)`` into a compile-only warm-up of each config the
autotuner would try (``Autotuner.warmup``). So the launch's specialisation (16-byte alignment of
pointers, divisibility of strides and sizes by 16, unit strides as constants) and the constexprs the
launcher sets are those of the kernel that really runs. For each compiled config it reads:

- PTX: tensor-core instructions (``wgmma.mma_async``; ``mma.sync`` would be the pre-Hopper path), TMA
  loads (``cp.async.bulk.tensor``) and pointer ``cp.async`` loads;
- ptxas ``-v`` (the ptxas Triton itself uses): registers, spill bytes, serialised-wgmma warnings;
- SASS (``cuobjdump -sass``): the innermost loops that issue ``HGMMA`` -- the main loops -- with their
  instruction count per iteration and the local-memory (spill) instructions inside them.

    python -m benchmarks.kernel_static                      # the kept autotune configs, bf16 hd128
    python -m benchmarks.kernel_static --space candidates   # every candidate config (to choose the kept ones)
    python -m benchmarks.kernel_static --json               # also print the results as one JSON line

Writes ``<out-dir>/kernel_static_sm90.md`` (``--space candidates``: ``kernel_static_sm90_candidates.md``).
TRITON_INTERPRET must be unset: under the interpreter nothing is compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import triton

from benchmarks.common import RESULTS_DIR, md_row, progress, versions

SM90_SHARED_MEMORY = 232448  # bytes per block on sm_90 (227 KiB)


class _Sm90Driver:
    """Just enough of a Triton driver for ``JITFunction.run(..., warmup=True)``: device 0, stream 0, sm_90."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@dataclass
class KernelConfig:
    """One compiled config of one kernel, as a launch in ``case`` compiled it."""
    case: str
    kernel: str
    config: str
    num_warps: int
    num_stages: int
    shared: int


@dataclass
class Compiled(KernelConfig):
    ptx: str = field(repr=False)
    cubin: bytes = field(repr=False)


@contextlib.contextmanager
def compile_only(module, kernel_names, space=None):
    """Within the block, ``module.<kernel>[grid](...)`` compiles (for sm_90) instead of launching; the
    compiled kernels are appended to the yielded list as (kernel name, "BLOCK_MxBLOCK_N", CompiledKernel).
    ``space``: {kernel name: configs} to compile instead of the kernel's own autotune configs."""
    from triton.runtime import driver
    compiled, originals, own_configs = [], {}, {}

    class _CompileOnly:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                kernel = self.kernel
                if not hasattr(kernel, "prune_configs"):  # a plain @triton.jit kernel
                    compiled.append((self.name, "-", kernel.warmup(*args, grid=grid, **kwargs)))
                    return
                kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.warmup does, config by config
                try:
                    for config in kernel.prune_configs(kwargs):
                        blocks = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                        compiled.append((self.name, blocks,
                                         kernel.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())))
                finally:
                    kernel.nargs = None
            return launch

    previous = getattr(driver, "_active", None)
    driver.set_active(_Sm90Driver())
    device_has_tma = module._device_has_tma
    module._device_has_tma = lambda device: True  # the CPU tensors stand for tensors on an sm_90 GPU
    try:
        for name in kernel_names:
            kernel = originals[name] = getattr(module, name)
            if space and name in space:
                own_configs[name], kernel.configs = kernel.configs, space[name]
            setattr(module, name, _CompileOnly(name, kernel))
        yield compiled
    finally:
        for name, kernel in originals.items():
            if name in own_configs:
                kernel.configs = own_configs[name]
            setattr(module, name, kernel)
        driver._active = previous  # reset_active() would look for a real GPU driver
        module._device_has_tma = device_has_tma


# ------------------------------------------------------------------------------------------ the cases

def _tensors(batch, seqlen, nheads, nheads_kv, headdim, dtype, headdim_v=None):
    q = torch.empty(batch, seqlen, nheads, headdim, dtype=dtype)
    k = torch.empty(batch, seqlen, nheads_kv, headdim, dtype=dtype)
    v = torch.empty(batch, seqlen, nheads_kv, headdim if headdim_v is None else headdim_v, dtype=dtype)
    return q, k, v


def cases(shape, dtype, headdim_v=None, softcap=None):
    """(name, run(ta)): each ``run`` calls the real launchers once as the library calls them: "fwd" as
    ``flash_attn_func`` (causal), "ring-fwd" and "bwd" as a causal ring step (fused merge / accumulation),
    "ring-fwd-full" as a ring step whose keys are all visible (the FULL variant), "varlen" packed
    sequences forward and backward, and the "-pointer" cases without TMA. ``shape``: (batch, seqlen,
    nheads, nheads_kv, headdim); ``headdim_v`` (default headdim: MLA's is smaller) and ``softcap`` select
    those kernel variants."""
    from dist_attn.kernels.positions import PackedPair, Positions
    batch, seqlen, nheads, nheads_kv, headdim = shape
    scale = headdim ** -0.5
    pos = Positions(0, 1, seqlen)
    out_shape = (batch, seqlen, nheads, headdim if headdim_v is None else headdim_v)

    def forward(ta):  # flash_attn_func: the output in the input dtype
        q, k, v = _tensors(*shape, dtype, headdim_v)
        ta.forward(q, k, v, scale, pos, pos, 0, seqlen, dtype, softcap=softcap)

    def ring_forward(ta):  # a ring step: merged into the float32 accumulators in the epilogue
        q, k, v = _tensors(*shape, dtype, headdim_v)
        accumulate = (torch.empty(out_shape), torch.empty(batch, nheads, seqlen))
        ta.forward(q, k, v, scale, pos, pos, 0, seqlen, torch.float32, accumulate, softcap=softcap)

    def ring_forward_full(ta):  # an off-diagonal causal ring step: every key visible (the FULL variant)
        q, k, v = _tensors(*shape, dtype, headdim_v)
        accumulate = (torch.empty(out_shape), torch.empty(batch, nheads, seqlen))
        ta.forward(q, k, v, scale, Positions(seqlen, 1, seqlen), pos, 2 * seqlen, 0, torch.float32, accumulate,
                   softcap=softcap)

    def backward(ta):  # a ring step: gradients added into the float32 accumulators
        q, k, v = _tensors(*shape, dtype, headdim_v)
        out, lse = torch.empty(out_shape, dtype=dtype), torch.empty(batch, nheads, seqlen)
        accumulate = tuple(torch.empty(t.shape) for t in (q, k, v))
        ta.backward(torch.empty_like(out), q, k, v, out, lse, scale, pos, pos, 0, seqlen, accumulate, softcap=softcap)

    def varlen_pairs(total):
        half = total // 2
        return [PackedPair(0, Positions(0, 1, half), 0, Positions(0, 1, half), 0, half),
                PackedPair(half, Positions(0, 1, total - half), half, Positions(0, 1, total - half), 0, total)]

    def packed(ta):
        total = batch * seqlen
        q, k, v = (t.reshape(total, *t.shape[2:]) for t in _tensors(*shape, dtype, headdim_v))
        pairs = varlen_pairs(total)
        out, lse = torch.empty(total, *out_shape[2:], dtype=torch.float32), torch.empty(nheads, total)
        ta.forward_varlen(q, k, v, scale, pairs, out, lse, softcap=softcap)
        ta.backward_varlen(torch.empty_like(out, dtype=dtype), q, k, v, out.to(dtype), lse, scale, pairs,
                           *(torch.empty(t.shape) for t in (q, k, v)), softcap=softcap)

    def pointer_path(run):  # what inputs TMA cannot read get (e.g. a non-contiguous head dim)
        def without_tma(ta):
            use_tma, ta.USE_TMA = ta.USE_TMA, False
            try:
                run(ta)
            finally:
                ta.USE_TMA = use_tma
        return without_tma

    return [("fwd", forward), ("ring-fwd", ring_forward), ("ring-fwd-full", ring_forward_full),
            ("bwd", backward), ("varlen", packed),
            ("fwd-pointer", pointer_path(ring_forward)), ("bwd-pointer", pointer_path(backward))]


KERNELS = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv", "_bwd_dq")


def compile_cases(shape, dtype, space=None, only=None, features=None):
    """Every config each case's launches compile, as ``Compiled`` records; ``features``: keyword arguments of
    ``cases`` (headdim_v, softcap)."""
    from dist_attn.kernels import triton_attention as ta
    records = []
    selected = [c for c in cases(shape, dtype, **(features or {})) if only is None or c[0] in only]
    for case, run in progress(selected, "compile for sm_90"):
        with compile_only(ta, KERNELS, space) as compiled:
            run(ta)
        for name, blocks, kernel in compiled:
            meta = kernel.metadata
            records.append(Compiled(case, name.lstrip("_"), blocks, meta.num_warps, meta.num_stages, meta.shared,
                                    kernel.asm["ptx"], kernel.asm["cubin"]))
    return records


def _case_reports(shape, dtype, space_name, case, features=None):
    """Compiles and analyses one case (in a worker process: cases compile in parallel)."""
    space = candidate_space() if space_name == "candidates" else None
    return [analyse(r) for r in compile_cases(shape, dtype, space, [case], features)]


def run_cases(shape, dtype, space_name="kept", only=None, jobs=1, features=None):
    """``Report`` s of every selected case, in case order; ``jobs`` worker processes compile cases side by
    side (Triton compiles one kernel on one core)."""
    names = [name for name, _ in cases(shape, dtype) if only is None or name in only]
    if jobs <= 1:
        return [r for name in progress(names, "compile + analyse")
                for r in _case_reports(shape, dtype, space_name, name, features)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_case_reports, shape, dtype, space_name, name, features) for name in names]
        return [r for future in progress(futures, "compile + analyse") for r in future.result()]


# ------------------------------------------------------------------------------------------ analysis

def _nvidia_tool(name):
    """Path of a CUDA tool shipped with Triton (ptxas as Triton picks it for sm_90)."""
    if name == "ptxas":
        from triton.backends.nvidia import compiler
        try:
            return compiler.get_ptxas(90).path
        except TypeError:  # older Triton: get_ptxas() without an architecture
            return compiler.get_ptxas().path
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path)


def ptxas_report(ptx):
    """(registers, spill store bytes, spill load bytes, serialised-wgmma warnings) from ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([_nvidia_tool("ptxas"), "-v", "--gpu-name=sm_90a", str(src), "-o", str(src) + ".o"],
                             capture_output=True, text=True)
    log = run.stdout + run.stderr
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log[-2000:]}")
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    serialised = len(re.findall(r"wgmma\.mma_async instructions are serialized", log))
    return (int(registers.group(1)) if registers else -1, int(spills.group(1)) if spills else 0,
            int(spills.group(2)) if spills else 0, serialised)


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_instructions(cubin):
    """[(address, instruction text)] of the cubin's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    return [(int(m.group(1), 16), m.group(2).strip()) for m in map(_SASS_LINE.search, sass.splitlines()) if m]


def main_loops(instructions):
    """The innermost loops (a backward branch and its target) that contain HGMMA: [(instructions per
    iteration, local-memory instructions inside)], smallest first. With masked and unmasked loops in one
    kernel, the smallest is the unmasked main loop."""
    index = {addr: i for i, (addr, _) in enumerate(instructions)}
    loops = []
    for i, (addr, text) in enumerate(instructions):
        branch = re.search(r"\bBRA\b(?:\.\w+)*\s+(?:`\()?\s*(0x[0-9a-f]+)", text)
        if branch:
            target = int(branch.group(1), 16)
            if target <= addr and target in index:
                loops.append((index[target], i))
    innermost = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    found = []
    for a, b in innermost:
        body = [text for _, text in instructions[a:b + 1]]
        if any("HGMMA" in t for t in body):
            found.append((len(body), sum(bool(re.search(r"\b(LDL|STL)\b", t)) for t in body)))
    return sorted(found)


@dataclass
class Report(KernelConfig):
    registers: int
    spill_stores: int
    spill_loads: int
    serialised_wgmma: int
    wgmma: int
    mma_sync: int
    tma_loads: int
    cp_async: int
    loops: list  # [(instructions per iteration, local-memory instructions)] of the HGMMA main loops

    @property
    def main_loop(self):
        return self.loops[0][0] if self.loops else 0

    @property
    def loop_spills(self):
        return sum(n for _, n in self.loops)


def analyse(record: Compiled) -> Report:
    ptx = record.ptx
    registers, stores, loads, serialised = ptxas_report(ptx)
    return Report(record.case, record.kernel, record.config, record.num_warps, record.num_stages, record.shared,
                  registers, stores, loads, serialised, ptx.count("wgmma.mma_async"), ptx.count("mma.sync"),
                  len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), len(re.findall(r"cp\.async\.(?:ca|cg)", ptx)),
                  main_loops(sass_instructions(record.cubin)))


# ------------------------------------------------------------------------------------------- output

def markdown(reports, command, shape, dtype):
    lines = [
        "# Kernel static check (sm_90a, compiled on CPU)",
        "",
        f"Command: `{command}`  ",
        f"Versions: {versions()}  ",
        f"Launch shape (batch, seqlen, heads, kv heads, head dim): {shape}, {dtype}; compiled through the real "
        "launchers with launch specialisation (see `benchmarks/kernel_static.py`). No GPU ran anything: "
        "these are compiler outputs, not timings.",
        "",
        "Main loop: SASS instructions per iteration of the smallest innermost loop with HGMMA (the unmasked "
        "loop); all loops: every such loop. Spills in loops: LDL/STL inside those loops. "
        "Cases: fwd = flash_attn_func (causal); ring-fwd / bwd = a causal ring step "
        "(fused merge / accumulation); ring-fwd-full = a ring step with every key visible (FULL variant); "
        "varlen = packed sequences; -pointer = without TMA (inputs TMA cannot read).",
        "",
        md_row(["case", "kernel", "BLOCK_MxN", "warps", "stages", "regs", "spill st/ld B", "spills in loops",
                "wgmma serialised", "shared KiB", "wgmma", "mma.sync", "TMA loads", "cp.async", "main loop",
                "all loops"]),
        md_row(["---"] * 16),
    ]
    for r in reports:
        lines.append(md_row([r.case, r.kernel, r.config, r.num_warps, r.num_stages, r.registers,
                             f"{r.spill_stores}/{r.spill_loads}", r.loop_spills, r.serialised_wgmma,
                             f"{r.shared / 1024:.0f}", r.wgmma, r.mma_sync, r.tma_loads, r.cp_async, r.main_loop,
                             " ".join(str(n) for n, _ in r.loops)]))
    return "\n".join(lines) + "\n"


def candidate_space():
    """Every (BLOCK_M, BLOCK_N) x warps x stages a kernel could use, to choose the kept configs from."""
    tiles = [(32, 64), (32, 128), (64, 32), (64, 64), (64, 128), (128, 32), (128, 64), (128, 128)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n in tiles for w in (4, 8) for s in (2, 3)]
    return {name: configs for name in ("_fwd_kernel", "_bwd_dkdv", "_bwd_dq")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_static", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", choices=["kept", "candidates"], default="kept")
    p.add_argument("--shape", type=int, nargs=5, default=[4, 4096, 32, 8, 128],
                   metavar=("BATCH", "SEQLEN", "HEADS", "KV_HEADS", "HEADDIM"))
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--headdim-v", type=int, default=None, help="v head dim (default: HEADDIM; MLA: e.g. 128 with 192)")
    p.add_argument("--softcap", type=float, default=None, help="compile the logit-softcap variants")
    p.add_argument("--cases", nargs="+", default=None,
                   help="fwd ring-fwd ring-fwd-full bwd varlen fwd-pointer bwd-pointer (default: all)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="cases compiled side by side")
    p.add_argument("--out-dir", default=str(RESULTS_DIR))
    p.add_argument("--json", action="store_true", help="print the reports as one JSON line at the end")
    return p.parse_args(argv)


def main(argv=None):
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false", "off", "no"):
        sys.exit("kernel_static: unset TRITON_INTERPRET (nothing is compiled under the interpreter)")
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    features = {"headdim_v": args.headdim_v, "softcap": args.softcap}
    reports = run_cases(tuple(args.shape), dtype, args.space, args.cases, args.jobs, features)
    command = "python -m benchmarks.kernel_static " + " ".join(argv if argv is not None else sys.argv[1:])
    text = markdown(reports, command.strip(), tuple(args.shape), args.dtype)
    stem = "kernel_static_sm90" + ("_candidates" if args.space == "candidates" else "")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {out_dir / (stem + '.md')}")
    if args.json:
        print(json.dumps([dict(asdict(r), main_loop=r.main_loop, loop_spills=r.loop_spills) for r in reports]))
    return reports


if __name__ == "__main__":
    main()
