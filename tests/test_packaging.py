"""dist-attn does not claim the top-level name ``kernels`` (Hugging Face's ``kernels`` package owns it).

The kernels install as ``dist_attn.kernels``: the built wheel holds ``dist_attn/kernels/`` and no top-level
``kernels/``, and in this venv, where the test extra installed Hugging Face's ``kernels`` beside dist-attn,
a fresh interpreter outside the repository imports both, each the right one. (Inside the test process the
repository root is on ``sys.path``, so its ``kernels/`` folder would shadow the installed package there.)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, torch, kernels, dist_attn.kernels as ours
from dist_attn.kernels import attention_reference, flash_attn_func
q = torch.randn(1, 9, 2, 8)
err = (flash_attn_func(q, q, q, causal=True, backend="torch") - attention_reference(q, q, q, causal=True)[0]).abs().max()
print(json.dumps({"hf": kernels.__file__, "hf_get_kernel": hasattr(kernels, "get_kernel"), "ours": ours.__file__,
                  "err": err.item()}))
"""


def test_hugging_face_kernels_and_dist_attn_import_side_by_side(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no PYTHONPATH: only what is installed
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "site-packages" in got["hf"] and got["hf_get_kernel"], got  # Hugging Face's, not ours
    assert Path(got["ours"]).resolve() == (REPO / "kernels" / "__init__.py").resolve(), got
    assert got["err"] <= 1e-5, got


def test_wheel_installs_the_kernels_under_dist_attn(tmp_path):
    source = tmp_path / "src"  # a copy (links kept), so the build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("dist_attn", "kernels"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("dist_attn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"dist_attn"}, top_level
    kernel_files = {p.name for p in (REPO / "kernels").glob("*.py")}
    assert {name.split("/")[-1] for name in names if name.startswith("dist_attn/kernels/")} == kernel_files, names
