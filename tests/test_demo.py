"""`python -m launch.demo` (what `make demo` runs): passes on good kernels, fails loudly on bad ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch import demo

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--seqlen", "64", "--interpret-seqlen", "40", "--heads", "4", "--kv-heads", "2", "--headdim", "32"]


def run_demo(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "launch.demo", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_demo_passes_and_prints_a_table():
    run = run_demo(*SMALL)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all checks passed" in run.stdout
    rows = [line for line in run.stdout.splitlines() if line.rstrip().endswith(" ok")]
    assert len(rows) == 4, run.stdout  # two backends x causal/non-causal


@pytest.mark.parametrize("args,message", [
    (["--kv-heads", "3"], "heads (8) must be divisible by kv_heads (3)"),
    (["--dtype", "float64"], "dtype must be one of"),
    (["--seqlen", "0"], "seqlen must be >= 1"),
])
def test_demo_rejects_bad_config(args, message):
    run = run_demo(*args)
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert "Traceback" not in run.stderr


def test_demo_fails_when_the_kernel_is_wrong(monkeypatch, capsys):
    real = demo.flash_attn_func
    monkeypatch.setattr(demo, "flash_attn_func", lambda q, k, v, **kw: real(q, k, v, **kw) * 1.001)
    assert demo.main(SMALL) == 1
    assert "SOME CHECKS FAILED" in capsys.readouterr().out
