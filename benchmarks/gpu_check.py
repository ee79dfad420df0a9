"""The pending kernel, ring-simulation and demo GPU figures in one command, on one CUDA GPU, in one process
tree, within about 8 minutes (estimated).

    python -m benchmarks.gpu_check                 # on the GPU box (``make gpu-check``): results in benchmarks/results/
    python -m benchmarks.gpu_check --dry-run       # the same stages on CPU with tiny shapes (CI): into a temp dir
    python -m benchmarks.gpu_check --list          # print the stages and their exact commands; run nothing
    python -m benchmarks.gpu_check --stages demo ring-sim --budget-s 200     # a subset

Stages (each a subprocess of this process, with its own time limit and log; a failed stage does not stop
the run). Phase 1 takes no timings, so its three stages run side by side; phase 2 runs one stage at a time,
alone on the GPU:

  phase 1  warm           parallel small runs of the benchmarks below (their own CLIs, tiny shapes; FlexAttention
                          at the real shapes): they fill Triton's and Inductor's on-disk compile caches in
                          parallel, so that phase 2 times kernels instead of compiling them. Advisory: cut at
                          its limit it only leaves the caches part-filled, and it does not fail the run then.
           tests-gpu      pytest -m gpu over tests/ (CUDA only tests: bf16/fp16 at realistic sizes)
           tests-kernels  pytest tests/test_kernels.py, test_kernels_varlen.py, test_kernels_fused.py on CUDA
                          (every mask, layout, head dim, bf16/fp16, varlen, fused merge, TMA vs pointer loads,
                          the FULL variant), -m "not gpu"
  phase 2  demo           launch.demo under torchrun at world size 1 on NCCL: Llama-3-8B heads (32/8, hd128),
                          bf16, 16K tokens, verified against float64
           kernel-hd128   benchmarks.kernel, head dim 128: fwd, bwd, fwd+bwd TFLOP/s at 1K-16K, causal and not,
                          ours vs SDPA flash / cuDNN / efficient and FlexAttention (math: dropped, memory-bound)
           ring-sim       benchmarks.ring_sim at w=8 with Llama-3-8B heads, 4K tokens per rank, every layout
           kernel-hd64    as kernel-hd128, head dim 64

How the stages were sized (estimates for an H200 with a cold compile cache: nothing was run on a GPU yet).
Compiling dominates: every (dtype, head dim, specialisation) of our kernels autotunes its whole config space
for each of fwd, dK/dV and dQ (16 configs each when this was sized; 3-4 kept configs since), about 2-5 s of
compile per config (5-8 s for the largest tiles on a 2-core CPU here), i.e. up to 1.5-3 minutes per family if done
serially; FlexAttention compiles once per shape. Hence phase 1: the compiles of all families
run at once on the 16 cores (xdist workers for the tests), about 2-4 minutes. Phase 2 then measures:
kernel-hd128 ~ 5 providers x 10 shapes x (fwd + bwd + fwd+bwd) x 13 calls at batch 4, 32 heads: the 16K
non-causal fwd+bwd alone is 62 TFLOP, about 1 minute in all with autotuning; hd64 a bit less; ring-sim at
4K tokens per rank (32K in all) about 30-40 s, its single-call baseline autotuning at 32K tokens; the demo
about 20-30 s, mostly start-up. Longer rings are out of this budget: the full-sequence baseline of 8K
tokens per rank (64K) adds about 1.5 minutes of autotuning; at 32K per rank (256K tokens) the autotuner
alone would time every config with at least 8 calls of ~4 s (a forward), beyond one 10-minute device command.
Run those by hand (``python -m benchmarks.ring_sim --worlds 8 --tokens-per-rank 8192 ...``).

Time limits (s; ``--list`` prints them): warm, tests-gpu and tests-kernels 240 each, side by side; demo 60;
kernel-hd128 120; ring-sim 90; kernel-hd64 90: at most 600 s (one device command's limit) with every stage
at its cap. The whole run has a budget on top (``--budget-s``, default 480): a stage gets at most what is
left of it after keeping each later stage's minimum slot (60, 30, 60, 45, 45 s), and a stage that cannot
get its minimum is skipped ("skipped: budget") and reported. A stage that runs past its limit is stopped
(SIGINT, so pytest still writes its JUnit file; then SIGTERM, SIGKILL, to its whole process group) and
reported "timeout".

Measuring (the method of the device notes): every timed stage runs alone on the GPU; each benchmark warms
up before timing and reports medians (CUDA events); inputs are random, never zeros; the GPU's clocks,
power, temperature and other processes are read with nvidia-smi before and after and written down, and
nothing about the card is changed.

Writes to ``--out-dir`` (default benchmarks/results; with --dry-run a new temporary directory):
``gpu_check_<device>.md`` (and .json): device, torch / triton / CUDA / cuDNN / driver versions, the GPU
state, and per stage its exact command, status, wall time, limit and result file; the benchmarks' own
results (kernel_<device>-hd128.md/.png, kernel_<device>-hd64.md/.png, ring_sim_<device>.md/.png,
demo_<device>.json) and, in ``gpu_check_<device>/``, every stage's log, the pytest JUnit files and
warm.json. When the environment variable OUT names a directory (the device machine's return folder),
the summary and a tarball of everything this run wrote (``gpu_check_<device>.tar.gz``, paths relative to
the out dir: ``tar -xzf gpu_check_<device>.tar.gz -C benchmarks/results``) are copied there after every
stage, so a run cut short still returns what it had. Exit code: 0 when every stage passed, 1 otherwise, 2
when no CUDA device is visible (without --dry-run).

This process itself imports no torch (only the subprocesses do); ``python`` in the commands below is the
interpreter running this module. A hidden stage ``self-test-fail`` (only with --stages) exits 1, so the
tests can check that a failure is reported.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_BUDGET_S = 480.0
# environment that must not leak into the stages: an interpreter switch, or a parent's torchrun world
_DROP_ENV = ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "ROLE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")
KERNEL_SEQLENS = [1024, 2048, 4096, 8192, 16384]
KERNEL_PROVIDERS = ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "flex"]  # and ours
LLAMA3_8B = ["--heads", "32", "--kv-heads", "8", "--headdim", "128"]


def log(message):
    print(f"[gpu-check {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ running

@dataclass
class Result:
    status: str           # passed | failed | timeout | interrupted
    rc: int | None
    wall_s: float


@dataclass
class _Proc:
    cmd: list
    log_path: Path
    limit_s: float
    popen: subprocess.Popen | None = None
    start: float = 0.0
    result: Result | None = None
    stop_stage: int = 0   # 0 running, 1 SIGINT sent, 2 SIGTERM sent, 3 SIGKILL sent
    stop_at: float = 0.0


_LIVE: list = []  # process groups started and not yet reaped (ended on interrupt)


def _signal_group(proc, sig):
    try:
        os.killpg(proc.popen.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _start(proc, env, cwd):
    proc.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(proc.log_path, "wb") as out:
        out.write(f"$ {shlex.join(str(c) for c in proc.cmd)}\n# cwd {cwd}; limit {proc.limit_s:.0f} s\n\n".encode())
        out.flush()
        proc.start = time.monotonic()
        proc.popen = subprocess.Popen([str(c) for c in proc.cmd], cwd=cwd, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _LIVE.append(proc)


def _poll(proc, now):
    """Advances one process: records its end, or escalates the stop of one past its limit."""
    if proc.result is not None:
        return True
    rc = proc.popen.poll()
    if rc is not None:
        _signal_group(proc, signal.SIGKILL)  # stragglers of its session (workers, children), if any
        status = "timeout" if proc.stop_stage else ("passed" if rc == 0 else "failed")
        proc.result = Result(status, rc, now - proc.start)
        _LIVE.remove(proc)
        return True
    elapsed = now - proc.start
    if proc.stop_stage == 0 and elapsed > proc.limit_s:
        proc.stop_stage, proc.stop_at = 1, now
        _signal_group(proc, signal.SIGINT)  # pytest writes its JUnit file on an interrupt
    elif proc.stop_stage == 1 and now - proc.stop_at > 10:
        proc.stop_stage, proc.stop_at = 2, now
        _signal_group(proc, signal.SIGTERM)
    elif proc.stop_stage == 2 and now - proc.stop_at > 5:
        proc.stop_stage, proc.stop_at = 3, now
        _signal_group(proc, signal.SIGKILL)
    return False


def run_commands(specs, env=None, cwd=ROOT, on_end=None):
    """Runs the commands ``specs`` = [(argv, log path, limit s)] side by side, each in its own process
    session with stdout and stderr into its log; one past its limit is stopped and reported "timeout".
    ``on_end(index, Result)`` is called as each one ends. Returns the Results in the order of ``specs``."""
    procs = [_Proc(list(cmd), Path(log_path), float(limit)) for cmd, log_path, limit in specs]
    for proc in procs:
        _start(proc, env, cwd)
    pending = set(range(len(procs)))
    while pending:
        now = time.monotonic()
        for i in sorted(pending):
            if _poll(procs[i], now):
                pending.discard(i)
                if on_end:
                    on_end(i, procs[i].result)
        if pending:
            time.sleep(0.2)
    return [proc.result for proc in procs]


def run_command(cmd, log_path, limit_s, env=None, cwd=ROOT):
    """One command: see ``run_commands``."""
    return run_commands([(cmd, log_path, limit_s)], env=env, cwd=cwd)[0]


def stop_all():
    """Stops every process group still running (on an interrupt of this process)."""
    for proc in list(_LIVE):
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in list(_LIVE):
        try:
            proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)
        proc.popen.wait()
        if proc.result is None:
            proc.result = Result("interrupted", proc.popen.returncode, time.monotonic() - proc.start)
        _LIVE.remove(proc)


# ------------------------------------------------------------------------------------------ stages

@dataclass
class Stage:
    name: str
    phase: int                 # 1: side by side, no timings; 2: one at a time, alone on the GPU
    what: str
    cmd: list                  # argv; for a stage with jobs, what is shown in the summary
    limit_s: float             # its own time limit
    min_s: float               # smallest useful slot: the budget keeps this much for it
    result: str                # result file, relative to the out dir
    jobs: list = field(default_factory=list)  # [(name, argv)]: run side by side (warm)
    advisory: bool = False     # a timeout does not fail the run
    status: str = "not run"
    rc: int | None = None
    wall_s: float | None = None
    limit_used: float | None = None
    note: str = ""
    log: str = ""


def _py(*args):
    return [sys.executable, *args]


def _rel(path):
    """A path under the repository as a relative path (commands run in its root), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def build_stages(slug, out_dir, logs_dir, scratch, dry_run, cpu_count=None):
    """The stages, in the order they run, for device ``slug``; with ``dry_run`` tiny CPU shapes."""
    cpu_count = cpu_count or os.cpu_count() or 1
    out, logs = _rel(out_dir), _rel(logs_dir)
    xdist = importlib.util.find_spec("xdist") is not None and not dry_run
    ring_tag = re.sub(r"[^a-z0-9]+", "_", slug.replace("-", " ")).strip("_")
    pytest = ["-m", "pytest", "-q", "-p", "no:cacheprovider"]
    if dry_run:
        device = ["--device", "cpu"]
        ours = "ours-torch"
        kernel_shape = ["--dtype", "fp32", "--seqlens", "128", "--batch", "1", "--heads", "2", "--reps", "2",
                        "--warmup", "0"]
        ring_args = ["--worlds", "2", "--tokens-per-rank", "16", "--heads", "4", "--kv-heads", "2", "--headdim", "16",
                     "--reps", "1", "--warmup", "0"]
        demo_args = ["--seqlen", "256", "--heads", "4", "--kv-heads", "2", "--headdim", "32", "--iters", "2",
                     "--warmup", "1"]
        kernel_tests = ["-k", "len17_causal or bad_position or packs_every"]  # a few fast cases (interpreter)
        warm_jobs = [
            ("ours-hd64", _py("-m", "benchmarks.kernel", *device, "--providers", ours, "--headdims", "64",
                              "--seqlens", "64", "--causal", "false", "--batch", "1", "--heads", "2", "--reps", "1",
                              "--warmup", "0", "--out-dir", f"{scratch}/ours-hd64", "--tag", "warm")),
            ("flex-hd64", _py("-m", "benchmarks.kernel", *device, "--providers", "flex", "--headdims", "64",
                              "--seqlens", "64", "--causal", "false", "--batch", "1", "--heads", "2", "--modes",
                              "fwd+bwd", "--reps", "1", "--warmup", "0", "--out-dir", f"{scratch}/flex-hd64",
                              "--tag", "warm")),
        ]
    else:
        device = ["--device", "cuda"]
        ours = "ours-triton"
        kernel_shape = ["--dtype", "bf16", "--seqlens", *map(str, KERNEL_SEQLENS), "--batch", "4", "--heads", "32",
                        "--reps", "10", "--warmup", "3"]
        ring_args = ["--worlds", "8", "--tokens-per-rank", "4096", *LLAMA3_8B, "--dtype", "bfloat16",
                     "--backend", "triton", "--reps", "3", "--warmup", "1"]
        demo_args = ["--seqlen", "16384", *LLAMA3_8B, "--dtype", "bfloat16", "--iters", "5", "--warmup", "2",
                     "--timeout", "300"]
        kernel_tests = ["-m", "not gpu"]  # the gpu-marked ones run in tests-gpu
        warm_jobs = []
        for hd in (128, 64):  # our kernels: tiny shapes, the benchmark's heads (specialisation) and dtype
            warm_jobs.append((f"ours-hd{hd}", _py(
                "-m", "benchmarks.kernel", *device, "--dtype", "bf16", "--providers", ours, "--headdims", str(hd),
                "--seqlens", "256", "--causal", "false", "--batch", "1", "--heads", "32", "--reps", "1",
                "--warmup", "0", "--out-dir", f"{scratch}/ours-hd{hd}", "--tag", "warm")))
        for hd in (128, 64):  # FlexAttention compiles per shape: the benchmark's exact shapes
            for causal in ("false", "true"):
                name = f"flex-hd{hd}-{'causal' if causal == 'true' else 'noncausal'}"
                warm_jobs.append((name, _py(
                    "-m", "benchmarks.kernel", *device, "--dtype", "bf16", "--providers", "flex", "--headdims",
                    str(hd), "--seqlens", *map(str, KERNEL_SEQLENS), "--causal", causal, "--batch", "4", "--heads",
                    "32", "--modes", "fwd+bwd", "--reps", "1", "--warmup", "0", "--out-dir", f"{scratch}/{name}",
                    "--tag", "warm")))
        for layout in ("contiguous", "zigzag", "striped"):  # the ring's calls (offsets, strides), tiny
            warm_jobs.append((f"ring-{layout}", _py(
                "-m", "benchmarks.ring_sim", *device, "--worlds", "8", "--tokens-per-rank", "64", "--layouts", layout,
                *LLAMA3_8B, "--dtype", "bfloat16", "--backend", "triton", "--reps", "1", "--warmup", "0",
                "--out-dir", f"{scratch}/ring-{layout}")))
    workers = lambda n: ["-n", str(n)] if xdist and cpu_count >= 2 * n else []  # noqa: E731
    kernel_stage = lambda hd, limit, min_s: Stage(  # noqa: E731
        f"kernel-hd{hd}", 2, f"kernel benchmark, head dim {hd}: fwd/bwd/fwd+bwd TFLOP/s vs SDPA and FlexAttention",
        _py("-m", "benchmarks.kernel", *device, *kernel_shape, "--headdims", str(hd), "--causal", "false", "true",
            "--providers", ours, *KERNEL_PROVIDERS, "--out-dir", out, "--tag", f"{slug}-hd{hd}"),
        limit, min_s, f"kernel_{slug}-hd{hd}.md")
    stages = [
        Stage("warm", 1, f"{len(warm_jobs)} small runs side by side: fill the compile caches",
              _py("-m", "benchmarks.gpu_check", "<each job of warm.json>"), 240, 60,
              f"{Path(logs).name}/warm.json", jobs=warm_jobs, advisory=True),
        Stage("tests-gpu", 1, "pytest -m gpu (CUDA-only tests)",
              _py(*pytest, "-m", "gpu", "tests", *workers(4), "--junitxml", f"{logs}/tests-gpu.xml"),
              240, 60, f"{Path(logs).name}/tests-gpu.xml"),
        Stage("tests-kernels", 1, "kernel tests on the device (" + ("a few fast cases" if dry_run else "all") + ")",
              _py(*pytest, *kernel_tests, "tests/test_kernels.py", "tests/test_kernels_varlen.py",
                  "tests/test_kernels_fused.py", "tests/test_kernels_features.py", *workers(8),
                  "--junitxml", f"{logs}/tests-kernels.xml"),
              240, 60, f"{Path(logs).name}/tests-kernels.xml"),
        Stage("demo", 2, "launch.demo under torchrun, world size 1 on " + ("gloo" if dry_run else "NCCL"),
              _py("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "launch.demo",
                  *demo_args, "--json", f"{out}/demo_{slug}.json"),
              60, 30, f"demo_{slug}.json"),
        kernel_stage(128, 120, 60),
        Stage("ring-sim", 2,
              "simulated ring, " + ("w=2, tiny" if dry_run else "w=8, Llama-3-8B heads, 4K tokens per rank"),
              _py("-m", "benchmarks.ring_sim", *device, *ring_args, "--out-dir", out),
              90, 45, f"ring_sim_{ring_tag}.md"),
        kernel_stage(64, 90, 45),
    ]
    return stages


def self_test_stage(logs_dir):
    return Stage("self-test-fail", 2, "self-test: a command that exits 1",
                 _py("-c", "import sys; print('self-test: failing on purpose'); sys.exit(1)"), 30, 1,
                 f"{Path(logs_dir).name}/self-test-fail.log")


# ------------------------------------------------------------------------------------------ environment

_INFO = r"""
import json, platform, sys
import torch
from benchmarks.common import machine_name, versions
info = {"versions": versions(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count(),
        "python": sys.executable}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as e:
    info["triton"] = f"not importable: {e}"
try:
    info["cudnn"] = torch.backends.cudnn.version()
except Exception as e:
    info["cudnn"] = None
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(device=machine_name("cuda:0"), sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                capability=f"{p.major}.{p.minor}")
else:
    info["device"] = machine_name("cpu")
print("GPU_CHECK_INFO " + json.dumps(info))
"""

_SMI_FIELDS = ("name,driver_version,pstate,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit,"
               "memory.used,memory.total,utilization.gpu,persistence_mode,compute_mode")


def _smi(*args):
    """nvidia-smi's answer (read-only queries), or None when it is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        run = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return run.stdout.strip() if run.returncode == 0 else None


def gpu_state():
    """One CSV line per GPU (clocks, temperature, power, memory, modes) and the compute processes on it."""
    state = _smi(f"--query-gpu={_SMI_FIELDS}", "--format=csv")
    apps = _smi("--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader")
    return {"gpus": state, "compute_apps": apps if apps is not None else None}


def probe(env):
    """Device and versions, read by a subprocess (so this process never touches CUDA)."""
    run = subprocess.run([sys.executable, "-c", _INFO], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    for line in run.stdout.splitlines():
        if line.startswith("GPU_CHECK_INFO "):
            info = json.loads(line.split(" ", 1)[1])
            break
    else:
        raise RuntimeError(f"could not read the device and versions (exit {run.returncode}):\n{run.stderr[-3000:]}")
    driver = _smi("--query-gpu=driver_version", "--format=csv,noheader")
    if driver is None and Path("/proc/driver/nvidia/version").exists():
        driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    info["driver"] = driver.splitlines()[0] if driver else "n/a"
    return info


def slug_of(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def stage_env(dry_run):
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("MPLBACKEND", "Agg")
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU even on a machine with a GPU
    return env


# ------------------------------------------------------------------------------------------ notes

def _junit_note(path):
    """'12 passed, 0 failed, 0 errors, 4 skipped' from a JUnit file; (note, total, skipped) or None."""
    import xml.etree.ElementTree as ET
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    note = f"{passed} passed, {count['failures']} failed, {count['errors']} errors, {count['skipped']} skipped"
    return note, count["tests"], count["skipped"]


def _demo_note(path):
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return (f"{'verified' if report.get('ok') else 'VERIFICATION FAILED'}; world {report.get('world_size')} on "
            f"{report.get('device')}; fwd {report.get('forward_ms', float('nan')):.2f} ms, bwd "
            f"{report.get('backward_ms', float('nan')):.2f} ms, {report.get('tflops_total', float('nan')):.3g} TFLOP/s, "
            f"peak {report.get('peak_memory_per_rank_bytes', 0) / 2**30:.2f} GiB")


def finish_stage(stage, out_dir, dry_run, started_at):
    """Checks the stage's result file and adds to its note; a passed stage without a fresh result fails."""
    path = Path(out_dir) / stage.result
    notes = [stage.note] if stage.note else []
    if stage.status == "passed" and not stage.jobs and (not path.exists() or path.stat().st_mtime < started_at - 1):
        stage.status = "failed"
        notes.append(f"exited 0 but wrote no {stage.result}")
    if stage.result.endswith(".xml") and path.exists():
        got = _junit_note(path)
        if got:
            notes.append(got[0])
            total, skipped = got[1], got[2]
            if stage.status == "passed" and not dry_run and total and skipped == total:
                stage.status = "failed"
                notes.append("every test skipped (CUDA not used?)")
    elif stage.name == "demo" and path.exists():
        notes.append(_demo_note(path) or "")
    elif stage.result.endswith(".md") and path.exists() and path.with_suffix(".png").exists():
        notes.append(f"plot: {path.with_suffix('.png').name}")
    stage.note = "; ".join(n for n in notes if n)


# ------------------------------------------------------------------------------------------ summary

def _show(cmd):
    return shlex.join(["python" if c == sys.executable else str(c) for c in cmd])


def summary_text(ctx, stages):
    info, dry = ctx["info"], ctx["dry_run"]
    bad = [s for s in stages if not stage_ok(s) and s.status not in ("not run", "running")]
    passed = sum(stage_ok(s) for s in stages)
    if any(s.status == "interrupted" for s in stages):
        verdict = f"INTERRUPTED: {passed} of {len(stages)} stages passed before the interrupt"
    elif any(s.status in ("not run", "running") for s in stages):
        verdict = f"in progress: {passed} of {len(stages)} stages passed so far"
    elif bad:
        verdict = f"{len(bad)} of {len(stages)} stages did not pass: " + ", ".join(f"{s.name} ({s.status})" for s in bad)
    else:
        verdict = f"all {len(stages)} stages passed"
    device = info.get("device", "?")
    if info.get("cuda_available"):
        device += f", {info['sms']} SMs, {info['memory_gib']} GiB, compute capability {info['capability']}"
        if info.get("device_count", 1) > 1:
            device += f" (GPU 0 of {info['device_count']} visible)"
    lines = [f"# GPU check: {info.get('device', '?')}" + (" (dry run on CPU, tiny shapes)" if dry else ""), "",
             f"- verdict: {verdict}",
             f"- device: {device}",
             f"- {info.get('versions', '')}; CUDA runtime {info.get('cuda_runtime')}, cuDNN {info.get('cudnn')}, "
             f"driver {info.get('driver')}",
             f"- python: `{info.get('python')}` (`python` in the commands below); cwd: the repository root; "
             f"PYTHONPATH=<repo root>; TRITON_INTERPRET unset"
             + ("; CUDA_VISIBLE_DEVICES empty (CPU)" if dry else ""),
             f"- date: {ctx['date']}; host {ctx['host']}",
             f"- command: `{_show([sys.executable, '-m', 'benchmarks.gpu_check', *ctx['argv']])}`",
             f"- budget {ctx['budget_s']:.0f} s; wall so far {time.monotonic() - ctx['t0']:.0f} s; "
             "phase 1 stages ran side by side (no timings), phase 2 stages one at a time",
             f"- out dir: `{ctx['out_dir']}`; logs: `{ctx['logs_dir']}`", ""]
    for label, key in (("GPU state at start", "state_start"), ("GPU state at end", "state_end")):
        state = ctx.get(key)
        if state and state.get("gpus"):
            lines += [f"{label} (nvidia-smi; compute processes: {state.get('compute_apps') or 'none'}):", "",
                      "```", state["gpus"], "```", ""]
    lines += ["| stage | phase | what | status | wall s | limit s | result | note |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in stages:
        wall = "" if s.wall_s is None else f"{s.wall_s:.1f}"
        limit = f"{s.limit_used:.0f}" if s.limit_used is not None else f"{s.limit_s:.0f}"
        path = Path(ctx["out_dir"]) / s.result
        result = s.result if path.exists() else f"{s.result} (missing)"
        if path.exists() and path.stat().st_mtime < ctx["wall_t0"] - 1:
            result += " (stale: from an earlier run)"
        lines.append(f"| {s.name} | {s.phase} | {s.what} | {s.status} | {wall} | {limit} | {result} | "
                     f"{s.note.replace('|', '/')} |")
    lines += ["", "## Commands", ""]
    for s in stages:
        lines += [f"### {s.name}: {s.status}", "", f"log: `{s.log}`", ""]
        if s.jobs:
            lines += [f"{len(s.jobs)} jobs side by side (their logs: `warm-<job>.log`):", ""]
            lines += [f"- {name}: `{_show(cmd)}`" for name, cmd in s.jobs]
        else:
            lines += ["```", _show(s.cmd), "```"]
        lines.append("")
    return "\n".join(lines)


def stage_ok(stage):
    return stage.status == "passed" or (stage.advisory and stage.status == "timeout")


def write_summary(ctx, stages):
    out_dir = Path(ctx["out_dir"])
    md = out_dir / f"gpu_check_{ctx['slug']}.md"
    md.write_text(summary_text(ctx, stages))
    data = {"device": ctx["info"].get("device"), "info": ctx["info"], "dry_run": ctx["dry_run"],
            "argv": ctx["argv"], "budget_s": ctx["budget_s"], "state_start": ctx.get("state_start"),
            "state_end": ctx.get("state_end"),
            "stages": [{"name": s.name, "phase": s.phase, "status": s.status, "rc": s.rc, "wall_s": s.wall_s,
                        "limit_s": s.limit_used if s.limit_used is not None else s.limit_s, "result": s.result,
                        "log": s.log, "note": s.note, "advisory": s.advisory,
                        "command": _show(s.cmd), "jobs": {n: _show(c) for n, c in s.jobs}} for s in stages]}
    (out_dir / f"gpu_check_{ctx['slug']}.json").write_text(json.dumps(data, indent=2))
    export(ctx, stages, md)
    return md


def export(ctx, stages, md):
    """Copies the summary and a tarball of everything this run wrote into $OUT, when it is a directory."""
    target = os.environ.get("OUT")
    if not target or not Path(target).is_dir() or Path(target).resolve() == Path(ctx["out_dir"]).resolve():
        return
    out_dir = Path(ctx["out_dir"])
    files = {md, md.with_suffix(".json")}
    files |= {p for p in Path(ctx["logs_dir"]).rglob("*") if p.is_file()}
    for s in stages:
        for p in (out_dir / s.result, (out_dir / s.result).with_suffix(".png")):
            if p.is_file():
                files.add(p)
    try:
        shutil.copy2(md, Path(target) / md.name)
        tmp = Path(target) / f".gpu_check_{ctx['slug']}.tar.gz.part"
        with tarfile.open(tmp, "w:gz") as tar:
            for p in sorted(files):
                tar.add(p, arcname=str(p.relative_to(out_dir)) if p.is_relative_to(out_dir) else p.name)
        tmp.replace(Path(target) / f"gpu_check_{ctx['slug']}.tar.gz")
    except OSError as error:
        log(f"could not export to $OUT={target}: {error}")


# ------------------------------------------------------------------------------------------ main

def _tail(path, lines=15):
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line[-300:] for line in text[-lines:])


def plan_slot(stages, index_group, budget_left):
    """The time a group of stages may run: the budget left after keeping every later stage's minimum."""
    later = [s for s in stages[max(index_group) + 1:] if s.status == "not run"]
    return budget_left - sum(s.min_s for s in later)


def run_stages(ctx, stages, env):
    out_dir, logs_dir = Path(ctx["out_dir"]), Path(ctx["logs_dir"])
    groups = []
    for i, s in enumerate(stages):  # phase-1 stages side by side, phase-2 ones alone
        if s.phase == 1 and groups and stages[groups[-1][0]].phase == 1:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        slot = plan_slot(stages, group, ctx["budget_s"] - (time.monotonic() - ctx["t0"]))
        specs, owners = [], []
        for i in group:
            s = stages[i]
            s.limit_used = min(s.limit_s, slot)
            if s.limit_used < s.min_s:
                s.status, s.note = "skipped: budget", f"{max(slot, 0):.0f} s left for it, needs {s.min_s:.0f}"
                log(f"skip  {s.name}: {s.note}")
                continue
            s.status, s.log = "running", _rel(logs_dir / f"{s.name}.log")
            if s.jobs:
                for name, cmd in s.jobs:
                    specs.append((cmd, logs_dir / f"warm-{name}.log", s.limit_used))
                    owners.append((i, name))
                log(f"start {s.name} (limit {s.limit_used:.0f} s): {len(s.jobs)} jobs side by side")
                (logs_dir / f"{s.name}.log").write_text("".join(f"{n}: {_show(c)}\n" for n, c in s.jobs))
            else:
                specs.append((s.cmd, logs_dir / f"{s.name}.log", s.limit_used))
                owners.append((i, None))
                log(f"start {s.name} (limit {s.limit_used:.0f} s): {_show(s.cmd)}")
        if not specs:
            continue
        started_at = time.time()
        job_results = {}

        def on_end(k, result):
            i, job = owners[k]
            s = stages[i]
            if job is not None:
                job_results.setdefault(i, {})[job] = result
                log(f"  job {s.name}/{job}: {result.status} in {result.wall_s:.1f} s")
                if len(job_results[i]) < len(s.jobs):
                    return
                results = job_results[i]
                statuses = [r.status for r in results.values()]
                s.status = ("failed" if "failed" in statuses else "timeout" if "timeout" in statuses else "passed")
                s.wall_s = max(r.wall_s for r in results.values())
                cut = [n for n, r in results.items() if r.status == "timeout"]
                broken = [n for n, r in results.items() if r.status == "failed"]
                s.note = "; ".join(filter(None, [f"failed: {', '.join(broken)}" if broken else "",
                                                 f"cut at the limit (caches part-filled): {', '.join(cut)}" if cut
                                                 else ""])) or f"{len(results)} jobs passed"
                (logs_dir / "warm.json").write_text(json.dumps(
                    {n: {"status": r.status, "rc": r.rc, "wall_s": round(r.wall_s, 1), "log": f"warm-{n}.log",
                         "command": _show(dict(s.jobs)[n])} for n, r in results.items()}, indent=2))
            else:
                s.status, s.rc, s.wall_s = result.status, result.rc, result.wall_s
                s.note = {"failed": f"exit code {result.rc}", "timeout": f"stopped at its {s.limit_used:.0f} s limit"
                          }.get(result.status, "")
            finish_stage(s, out_dir, ctx["dry_run"], started_at)
            log(f"end   {s.name}: {s.status} in {s.wall_s:.1f} s" + (f" ({s.note})" if s.note else ""))
            if not stage_ok(s):
                log_path = logs_dir / (f"warm-{broken[0]}.log" if job is not None and broken else f"{s.name}.log")
                print(f"  last lines of {_rel(log_path)}:\n{_tail(log_path)}", flush=True)
            write_summary(ctx, stages)

        run_commands(specs, env=env, on_end=on_end)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same stages on CPU with tiny shapes (CI)")
    p.add_argument("--out-dir", help="default: benchmarks/results (with --dry-run: a new temporary directory)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="time for the whole run (default 480)")
    p.add_argument("--stages", nargs="+", help="run only these (default: all), in the usual order")
    p.add_argument("--list", action="store_true", help="print the stages and commands, run nothing")
    return p.parse_args(argv)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    t0 = time.monotonic()
    env = stage_env(args.dry_run)
    try:
        info = probe(env)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"gpu_check: error: {error}", file=sys.stderr)
        return 2
    if not args.dry_run and not info["cuda_available"] and not args.list:
        print("gpu_check: error: no CUDA device is visible here; on CPU use --dry-run", file=sys.stderr)
        return 2
    slug = "cpu" if args.dry_run else slug_of(info["device"]) if info["cuda_available"] else "gpu"
    made_out_dir = args.dry_run and not args.out_dir
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp(prefix="gpu_check_dry_")) if args.dry_run else RESULTS_DIR)
    out_dir = out_dir.resolve()
    logs_dir = out_dir / f"gpu_check_{slug}"
    # the warm-up's throw-away outputs (removed at the end); --list only shows where they would go
    scratch = Path(tempfile.gettempdir(), "gpu_check_warm_XXXX") if args.list else \
        Path(tempfile.mkdtemp(prefix="gpu_check_warm_"))
    stages = build_stages(slug, out_dir, logs_dir, scratch, args.dry_run)
    known = {s.name: s for s in stages}
    known["self-test-fail"] = self_test_stage(logs_dir)
    if args.stages:
        unknown = [n for n in args.stages if n not in known]
        if unknown:
            print(f"gpu_check: error: unknown stages {unknown}; known: {[s.name for s in stages]}", file=sys.stderr)
            for made in (scratch, out_dir if made_out_dir else None):
                if made:
                    shutil.rmtree(made, ignore_errors=True)
            return 2
        stages = [s for s in [*stages, known["self-test-fail"]] if s.name in args.stages]
    if args.list:
        for s in stages:
            print(f"{s.name} (phase {s.phase}, limit {s.limit_s:.0f} s, min {s.min_s:.0f} s): {s.what}")
            for name, cmd in s.jobs or [(None, s.cmd)]:
                print(f"    {name + ': ' if name else ''}{_show(cmd)}")
        if made_out_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        return 0
    logs_dir.mkdir(parents=True, exist_ok=True)
    ctx = dict(info=info, dry_run=args.dry_run, slug=slug, out_dir=str(out_dir), logs_dir=str(logs_dir),
               argv=argv, budget_s=args.budget_s, t0=t0, wall_t0=time.time(), host=os.uname().nodename,
               date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               state_start=None if args.dry_run else gpu_state())
    log(f"{info['device']}; {info['versions']}; {len(stages)} stages, budget {args.budget_s:.0f} s; "
        f"results in {out_dir}")
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        write_summary(ctx, stages)
        run_stages(ctx, stages, env)
    except KeyboardInterrupt:
        log("interrupted: stopping the running stages")
        stop_all()
        for s in stages:
            if s.status == "running":
                s.status = "interrupted"
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(scratch, ignore_errors=True)
        if not args.dry_run:
            ctx["state_end"] = gpu_state()
        md = write_summary(ctx, stages)
    print("\n" + md.read_text().split("\n## Commands")[0])
    log(f"wrote {md} in {time.monotonic() - t0:.0f} s")
    return 0 if all(stage_ok(s) for s in stages) else 1


if __name__ == "__main__":
    sys.exit(main())
