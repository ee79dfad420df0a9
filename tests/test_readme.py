"""The README's quick start runs as written: the block after ``<!-- quickstart -->``, saved to a file and
launched with torchrun on 2 gloo ranks, prints an error against one device within the fp32 tolerance."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def quickstart_code():
    text = (REPO / "README.md").read_text()
    match = re.search(r"<!-- quickstart -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no ```python block after <!-- quickstart -->"
    return match.group(1)


def test_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(quickstart_code())
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    match = re.search(r"max error against one device: (\S+)", out.stdout)
    assert match, out.stdout[-2000:]
    assert float(match.group(1)) <= 2e-5, out.stdout
