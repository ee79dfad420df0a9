"""Static performance check: the Triton kernels compiled for Hopper (sm_90a) exactly as a launch would
compile them, on a machine without a GPU (``benchmarks/kernel_static.py``).

CI has no GPU, and Triton's interpreter runs Python that the Triton compiler rejects, so a kernel that
would not build on the GPU fails here first. Beyond "it compiles", every kept autotune config of the
16-bit kernels must use Hopper's tensor cores (wgmma, no mma.sync fallback), keep its main loops free of
register spills and of serialised wgmma, fit sm_90's shared memory, and stream its tiles through TMA
where the launcher turns TMA on (through cp.async pointer loads where it does not).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_attn.kernels import triton_attention as ta

ROOT = Path(__file__).resolve().parent.parent
SM90_SHARED_MEMORY = 232448  # bytes per block on sm_90 (227 KiB)
ATTENTION_KERNELS = {"fwd_kernel", "bwd_dkdv", "bwd_dq"}


# fp16 with MLA head dims (q/k 192, padded to 256; v 128) and the softcap variants; the float32 (IEEE) path
OTHER_VARIANTS = {"fp16-mla-softcap": ["--dtype", "fp16", "--shape", "2", "1024", "8", "2", "192", "--headdim-v", "128",
                                       "--softcap", "30"],
                  "fp32": ["--dtype", "fp32", "--shape", "2", "1024", "8", "2", "64"]}


def start_compile(tmp_dir, *args):
    """Starts ``benchmarks.kernel_static`` for ``args`` in a subprocess (one compile is single-threaded: the three
    of this module run side by side)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = str(ROOT)
    env["TRITON_CACHE_DIR"] = str(tmp_dir / "triton-cache")  # compile everything: no cache from earlier runs
    return subprocess.Popen([sys.executable, "-m", "benchmarks.kernel_static", "--json", "--out-dir", str(tmp_dir),
                             *args], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def reports_of(proc):
    try:
        stdout, stderr = proc.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("benchmarks.kernel_static did not finish within 1200 s")
    assert proc.returncode == 0, stderr[-4000:]
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def all_reports(tmp_path_factory):
    """bf16, head dim 128, Llama-3-8B-like heads (32 / 8): every case of the static check; and OTHER_VARIANTS for
    the ring forward and the backward."""
    procs = {"bf16": start_compile(tmp_path_factory.mktemp("static"), "--shape", "4", "4096", "32", "8", "128")}
    for name, args in OTHER_VARIANTS.items():
        procs[name] = start_compile(tmp_path_factory.mktemp(f"static-{name}"), *args, "--cases", "ring-fwd", "bwd")
    return {dtype: reports_of(proc) for dtype, proc in procs.items()}


@pytest.fixture(scope="module")
def bf16_reports(all_reports):
    return all_reports["bf16"]


def label(r):
    return f"{r['case']}/{r['kernel']} {r['config']} w{r['num_warps']} s{r['num_stages']}"


def test_every_case_compiles_its_kernels(bf16_reports):
    seen = {(r["case"], r["kernel"]) for r in bf16_reports}
    for case in ("fwd", "ring-fwd", "fwd-pointer"):
        assert (case, "fwd_kernel") in seen
    for case in ("bwd", "bwd-pointer", "varlen"):
        assert {(case, "bwd_preprocess"), (case, "bwd_dkdv"), (case, "bwd_dq")} <= seen
    assert ("varlen", "fwd_kernel") in seen


def test_tensor_cores_without_spills_in_main_loops(bf16_reports):
    bad = []
    for r in bf16_reports:
        if r["kernel"] not in ATTENTION_KERNELS:
            continue
        if r["wgmma"] == 0 or r["mma_sync"]:
            bad.append(f"{label(r)}: wgmma {r['wgmma']}, mma.sync {r['mma_sync']}")
        if not r["loops"]:
            bad.append(f"{label(r)}: no main loop with HGMMA found in the SASS")
        if r["loop_spills"]:
            bad.append(f"{label(r)}: {r['loop_spills']} local-memory instructions in its main loops")
        if r["serialised_wgmma"]:
            bad.append(f"{label(r)}: ptxas serialised its wgmma")
    assert not bad, "\n".join(bad)


def test_shared_memory_fits_sm90(bf16_reports):
    over = [f"{label(r)}: {r['shared']} B" for r in bf16_reports if r["shared"] > SM90_SHARED_MEMORY]
    assert not over, over


@pytest.mark.skipif(not ta.TMA_SUPPORTED, reason="this Triton has no tensor descriptors")
def test_tma_where_the_launcher_turns_it_on(bf16_reports):
    for r in bf16_reports:
        if r["kernel"] not in ATTENTION_KERNELS:
            continue
        if r["case"].endswith("-pointer"):
            assert r["tma_loads"] == 0 and r["cp_async"] > 0, label(r)
        else:  # contiguous, aligned inputs: the streamed tiles come through TMA
            assert r["tma_loads"] > 0, f"{label(r)}: no cp.async.bulk.tensor load"


@pytest.mark.parametrize("variant", OTHER_VARIANTS)
def test_other_variants_compile_and_fit(all_reports, variant):
    """MLA head dims with softcap (fp16) and the float32 (IEEE) path: compile and fit sm_90's shared memory; the
    16-bit MLA kernels also use wgmma and keep their main loops free of spills."""
    reports = all_reports[variant]
    assert {r["kernel"] for r in reports} == ATTENTION_KERNELS | {"bwd_preprocess"}
    over = [f"{label(r)}: {r['shared']} B" for r in reports if r["shared"] > SM90_SHARED_MEMORY]
    assert not over, over
    if variant.startswith("fp16"):
        bad = [label(r) for r in reports if r["kernel"] in ATTENTION_KERNELS
               and (r["wgmma"] == 0 or r["mma_sync"] or r["loop_spills"])]
        assert not bad, bad
