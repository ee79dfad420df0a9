"""`python -m launch.demo`, the main job (`make demo`): verifies, reports, and fails loudly."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--world-size", "2", "--seqlen", "256", "--heads", "4", "--kv-heads", "2", "--headdim", "32",
         "--iters", "1", "--warmup", "0"]


def run_demo(*args):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "launch.demo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("extra", [[], ["--dtype", "bfloat16", "--layout", "striped", "--no-causal"]],
                         ids=["fp32-zigzag-causal", "bf16-striped"])
def test_demo_verifies_and_reports(tmp_path, extra):
    report_path = tmp_path / "report.json"
    run = run_demo(*SMALL, *extra, "--json", str(report_path))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verified: outputs and gradients match exact attention" in run.stdout
    for label in ("forward / iteration", "tokens / s", "TFLOP/s per rank", "peak memory / rank", "ring bytes / step"):
        assert label in run.stdout
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["world_size"] == 2
    assert all(c["ok"] and c["max_err"] <= c["tolerance"] for c in report["check"].values())
    assert report["forward_ms"] > 0 and report["backward_ms"] > 0
    # world 2: one K/V message forward; one K/V and two dK/dV (fp32) messages backward
    kv_bytes = 2 * 1 * 128 * 2 * 32 * (2 if "bfloat16" in extra else 4)
    assert report["ring_messages"] == {"forward": 1, "backward": 3}
    assert report["ring_bytes_total"] == {"forward": kv_bytes, "backward": kv_bytes + 2 * (2 * 128 * 2 * 32 * 4)}


def test_hierarchical_ring_on_emulated_nodes(monkeypatch):
    """4 ranks as 2 nodes of 2 (DIST_ATTN_LOCAL_WORLD_SIZE): the double ring verifies like the flat one."""
    monkeypatch.setenv("DIST_ATTN_LOCAL_WORLD_SIZE", "2")
    run = run_demo(*SMALL[2:], "--world-size", "4", "--topology", "hierarchical")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "topology hierarchical" in run.stdout and "verified" in run.stdout


def test_a_corrupted_rank_fails_the_check():
    run = run_demo(*SMALL, "--corrupt-rank", "1")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "VERIFICATION FAILED" in run.stdout


@pytest.mark.parametrize("args,message", [
    (["--seqlen", "258"], "seqlen (258) must be a multiple of 4 for layout='zigzag' on 2 ranks"),
    (["--kv-heads", "3"], "heads (4) must be divisible by kv_heads (3)"),
    (["--corrupt-rank", "5"], "corrupt_rank must be < world size (2)"),
    (["--dtype", "float64"], "dtype must be one of"),
    (["--layout", "ring"], "layout must be one of"),
    (["--topology", "star"], "topology must be one of"),
])
def test_bad_config_is_one_clear_line(args, message):
    run = run_demo(*SMALL, *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr


def test_run_sh_launches_the_demo_under_torchrun():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(ROOT), PYTHON=sys.executable, NGPU="2", MASTER_PORT="29517")
    run = subprocess.run(["bash", str(ROOT / "launch" / "run.sh"), "launch.demo", *SMALL[2:]], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "verified: outputs and gradients match exact attention" in run.stdout
    assert "ring attention on 2 rank(s)" in run.stdout


# ---------------------------------------------------------------------------------------------- faults

FAULT_TIMEOUT_S = 20  # --timeout: the process group's; a failing rank's peers must give up within it


def test_a_rank_failing_mid_ring_exits_with_one_line():
    start = time.monotonic()
    run = run_demo(*SMALL, "--fail-rank", "1", "--timeout", str(FAULT_TIMEOUT_S))
    elapsed = time.monotonic() - start
    assert run.returncode == 1, run.stdout + run.stderr
    last = run.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"launch\.demo: error: world of 2: rank 1 failed: RuntimeError: injected fault: kernel "
                         r"call 2 of the ring forward on rank 1; then rank 0 failed waiting for it \(every rank's "
                         r"traceback: (\S+\.log)\)", last)
    assert match, run.stderr
    assert "Traceback" not in run.stderr and run.stderr.count("launch.demo: error") == 1, run.stderr
    log = Path(match[1])
    try:
        tracebacks = log.read_text()
        assert "dist_attn.comm.RingTimeoutError: ring_attention: rank 0: " in tracebacks, tracebacks
        assert f"the process group's timeout is {FAULT_TIMEOUT_S} s" in tracebacks, tracebacks
    finally:
        log.unlink()
    assert elapsed < FAULT_TIMEOUT_S + 60, elapsed  # starting 2 ranks, then at most one timeout


def test_a_rank_failing_mid_ring_under_torchrun_prints_one_line_per_rank():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = str(ROOT)
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", "-m", "launch.demo", *SMALL[2:], "--fail-rank", "1",
                          "--timeout", str(FAULT_TIMEOUT_S)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - start
    assert run.returncode != 0, run.stdout + run.stderr
    ours = [line[line.index("launch.demo: error"):] for line in run.stderr.splitlines() if "launch.demo: error" in line]
    root = "launch.demo: error: rank 1 failed: RuntimeError: injected fault: kernel call 2 of the ring forward on rank 1"
    assert root in ours and len(ours) <= 2, run.stderr
    # rank 0 fails at once (its connection to rank 1 closes) but torchrun may SIGTERM it before it prints
    assert all(line.startswith("launch.demo: error: rank 0 stopped, as a peer failed: ") for line in ours
               if line != root), run.stderr
    assert "inject_ring_fault" not in run.stderr and "RingAttnFunc" not in run.stderr  # no traceback of ours
    assert elapsed < FAULT_TIMEOUT_S + 60, elapsed


@pytest.mark.parametrize("args,message", [
    (["--fail-rank", "2"], "fail_rank must be < world size (2)"),
    (["--timeout", "0"], "timeout must be > 0 seconds"),
])
def test_bad_fault_options_are_one_clear_line(args, message):
    run = run_demo(*SMALL, *args)
    assert run.returncode == 2, run.stdout + run.stderr
    assert message in run.stderr and run.stderr.strip().count("\n") == 0, run.stderr
