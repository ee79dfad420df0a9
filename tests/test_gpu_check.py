"""benchmarks/gpu_check.py (``make gpu-check``): its --dry-run runs every stage on CPU with tiny shapes and
reports each one passed with its result file; a failing or hanging stage is reported as such, with a
non-zero exit code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["warm", "tests-gpu", "tests-kernels", "demo", "kernel-hd128", "ring-sim", "kernel-hd64"]


def run_gpu_check(*args, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def summary_rows(md_text):
    """stage name -> cells of the summary table (stage, phase, what, status, wall s, limit s, result, note)."""
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in md_text.splitlines()
            if line.startswith("| ") and not line.startswith("| stage ") and not line.startswith("| ---")]
    return {row[0]: row for row in rows}


@pytest.mark.timeout(240)
def test_dry_run_passes_every_stage_and_writes_every_result(tmp_path):
    run = run_gpu_check("--dry-run", "--out-dir", str(tmp_path), timeout=230)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    md = tmp_path / "gpu_check_cpu.md"
    assert md.exists(), list(tmp_path.iterdir())
    text = md.read_text()
    assert "- verdict: all 7 stages passed" in text, text
    rows = summary_rows(text)
    assert list(rows) == STAGES, text
    summary = json.loads((tmp_path / "gpu_check_cpu.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    for stage in summary["stages"]:
        name = stage["name"]
        assert rows[name][3] == "passed" and stage["status"] == "passed", (name, rows[name], stage)
        assert float(rows[name][4]) > 0, rows[name]  # wall time
        result = tmp_path / stage["result"]
        assert result.is_file() and result.stat().st_size > 0, (name, stage["result"], sorted(tmp_path.rglob("*")))
        assert rows[name][6] == stage["result"], rows[name]
        assert (ROOT / stage["log"]).is_file() or Path(stage["log"]).is_file(), stage["log"]
        assert f"### {name}: passed" in text
    # the exact commands are recorded; the dry run writes only into --out-dir
    assert "python -m benchmarks.kernel --device cpu" in text and "--tag cpu-hd128" in text
    assert "python -m torch.distributed.run --standalone --nproc_per_node 1 -m launch.demo" in text
    assert "world size 1 on gloo" in text
    assert re.search(r"python -m pytest .* -m gpu tests", text), text
    assert "torch " in text and "triton " in text and "- device: CPU" in text
    for name in ("kernel_cpu-hd128.md", "kernel_cpu-hd64.md", "ring_sim_cpu.md", "demo_cpu.json"):
        assert (tmp_path / name).is_file(), name
    demo = json.loads((tmp_path / "demo_cpu.json").read_text())
    assert demo["ok"] and demo["world_size"] == 1
    # every stage announced its start and its end
    for name in STAGES:
        assert re.search(rf"start {re.escape(name)} \(limit", run.stdout), run.stdout
        assert re.search(rf"end   {re.escape(name)}: passed", run.stdout), run.stdout


def test_a_failing_stage_fails_the_run(tmp_path):
    run = run_gpu_check("--dry-run", "--out-dir", str(tmp_path), "--stages", "self-test-fail", timeout=120)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
    text = (tmp_path / "gpu_check_cpu.md").read_text()
    assert summary_rows(text)["self-test-fail"][3] == "failed", text
    assert "did not pass: self-test-fail (failed)" in text
    assert "end   self-test-fail: failed" in run.stdout
    assert "self-test: failing on purpose" in run.stdout  # the log's tail is shown


def test_stage_runner_reports_failure_timeout_and_logs(tmp_path):
    ok = gpu_check.run_command([sys.executable, "-c", "print('hello')"], tmp_path / "ok.log", 30)
    assert (ok.status, ok.rc) == ("passed", 0)
    assert "hello" in (tmp_path / "ok.log").read_text()
    bad = gpu_check.run_command([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], tmp_path / "bad.log", 30)
    assert (bad.status, bad.rc) == ("failed", 3)
    assert "boom" in (tmp_path / "bad.log").read_text()
    # a stage past its limit is stopped, with the children it started
    slow = gpu_check.run_command([sys.executable, "-c", "import subprocess, sys, time; "
                                  "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                                  "print('child', p.pid, flush=True); time.sleep(60)"], tmp_path / "slow.log", 4)
    assert slow.status == "timeout" and slow.wall_s < 25, slow
    log = (tmp_path / "slow.log").read_text()
    found = re.search(r"^child (\d+)$", log, re.M)
    assert found, log
    stat = Path(f"/proc/{found.group(1)}/stat")
    if Path("/proc/self/stat").exists():  # the child is gone, or a zombie nobody reaped yet: not running
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", stat.read_text()


def test_budget_skips_what_does_not_fit(tmp_path):
    run = run_gpu_check("--dry-run", "--out-dir", str(tmp_path), "--stages", "self-test-fail", "--budget-s", "0",
                        timeout=120)
    assert run.returncode == 1
    text = (tmp_path / "gpu_check_cpu.md").read_text()
    assert summary_rows(text)["self-test-fail"][3] == "skipped: budget", text


def test_gpu_commands_and_limits():
    """The stages the GPU box runs: the shapes of the issue, and limits that fit the budget's intent."""
    stages = gpu_check.build_stages("nvidia-h200", ROOT / "benchmarks" / "results", ROOT / "benchmarks" / "results" /
                                    "gpu_check_nvidia-h200", Path("/tmp/scratch"), dry_run=False, cpu_count=16)
    by_name = {s.name: s for s in stages}
    assert list(by_name) == STAGES
    show = {name: gpu_check._show(s.cmd) for name, s in by_name.items()}
    assert "--device cuda" in show["kernel-hd128"] and "--headdims 128" in show["kernel-hd128"]
    assert "--seqlens 1024 2048 4096 8192 16384" in show["kernel-hd64"]
    assert "--providers ours-triton sdpa-flash sdpa-cudnn sdpa-efficient flex" in show["kernel-hd128"]
    assert "--worlds 8" in show["ring-sim"] and "--heads 32 --kv-heads 8 --headdim 128" in show["ring-sim"]
    assert "--dtype bfloat16" in show["demo"] and "--nproc_per_node 1" in show["demo"]
    assert "-m 'not gpu' tests/test_kernels.py tests/test_kernels_varlen.py" in show["tests-kernels"]
    # phase 1 runs side by side: the run's limit is the longest of it plus every phase-2 limit
    phase1 = max(s.limit_s for s in stages if s.phase == 1)
    assert phase1 + sum(s.limit_s for s in stages if s.phase == 2) <= 600  # one device command: 10 minutes
    assert sum(s.min_s for s in stages if s.phase == 2) + phase1 <= gpu_check.DEFAULT_BUDGET_S
    assert "benchmarks/results/gpu_check_nvidia-h200/tests-gpu.xml" in show["tests-gpu"]


def test_kernel_benchmark_providers_option(tmp_path):
    from benchmarks import kernel
    md = kernel.main(["--device", "cpu", "--seqlens", "64", "--headdims", "16", "--batch", "1", "--heads", "2",
                      "--reps", "1", "--warmup", "0", "--causal", "false", "--providers", "ours-torch", "sdpa-math",
                      "--out-dir", str(tmp_path), "--tag", "prov"])
    text = md.read_text()
    cells = [line.split("|")[4].strip() for line in text.splitlines() if re.match(r"\| 16 \| false \| 64 \| ", line)]
    providers = {c for c in cells if c not in ("fwd", "bwd", "fwd+bwd")}  # the ratio table has a mode there
    assert providers == {"ours-torch", "sdpa-math"}, text
    with pytest.raises(ValueError, match="providers"):
        kernel.BenchConfig(device="cpu", providers=["sdpa-bogus"])
    with pytest.raises(ValueError, match="providers"):
        kernel.run(kernel.BenchConfig(device="cpu", providers=["ours-triton"]))
