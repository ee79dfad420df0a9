"""The README's quick start runs as written: the block after ``<!-- quickstart -->``, saved to a file and
launched with torchrun on 2 gloo ranks, prints an error against one device within the fp32 tolerance."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def quickstart_code():
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- quickstart -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no ```python block after <!-- quickstart -->"
    return match.group(1)


def test_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_code())
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: a hang kills torchrun and its ranks
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the quick start did not finish within 180 s: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    match = re.search(r"max error against one device: (\S+)", stdout)
    assert match, stdout[-2000:]
    assert float(match.group(1)) <= 2e-5, stdout
