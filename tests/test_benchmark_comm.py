"""benchmarks/comm.py: the ring-exchange bandwidth benchmark writes its files, and the alpha-beta fit is right."""

from __future__ import annotations

import json
import math
import re

import pytest

from benchmarks import comm


def test_smoke_writes_markdown_plot_and_json(tmp_path):
    md = comm.main(["--max-bytes", "65536", "--iters", "2", "--rounds", "1", "--warmup", "1",
                    "--out-dir", tmp_path, "--timeout-s", "120"])
    assert md == tmp_path / "comm_gloo.md"
    assert (tmp_path / "comm_gloo.png").stat().st_size > 0
    text = md.read_text()
    assert re.search(r"latency [\d.]+ us, bandwidth [\d.]+ GB/s", text)
    assert "not NVLink or InfiniBand" in text and "command: `python -m benchmarks.comm" in text
    rows = [line.split("|")[1:-1] for line in text.splitlines() if re.match(r"\| \d+ (KiB|MiB|B) \|", line)]
    assert [int(r[1].strip().replace(",", "")) for r in rows] == [1024, 4096, 16384, 65536]
    for row in rows:
        median_us, min_us, gbps = (float(row[i].strip().replace(",", "")) for i in (2, 3, 4))
        assert all(math.isfinite(x) and x > 0 for x in (median_us, min_us, gbps)), row
        assert min_us <= median_us
    record = json.loads((tmp_path / "comm_gloo.json").read_text())
    assert record["backend"] == "gloo" and record["world_size"] == 2 and record["device"]
    assert record["alpha_s"] > 0 and record["beta_bytes_per_s"] > 0
    assert all(math.isfinite(record[k]) for k in ("alpha_s", "beta_bytes_per_s"))
    assert record["sizes_bytes"] == [1024, 4096, 16384, 65536]
    assert all(t > 0 for t in record["median_s"])


@pytest.mark.parametrize("n_large", [None, 3])
def test_fit_recovers_alpha_and_beta_from_exact_data(n_large):
    alpha, beta = 25e-6, 12.5e9
    sizes = [1024 * 4**i for i in range(10)]
    times = [alpha + n / beta for n in sizes]
    got_alpha, got_beta = comm.fit_alpha_beta(sizes, times, n_large=n_large)
    assert got_alpha == pytest.approx(alpha, rel=1e-6)
    assert got_beta == pytest.approx(beta, rel=1e-6)
    # the order of the points does not matter
    assert comm.fit_alpha_beta(sizes[::-1], times[::-1], n_large=n_large) == pytest.approx((got_alpha, got_beta))


def test_fit_falls_back_on_noise():
    # the large points decrease with size (noise): beta is the best measured bandwidth, alpha stays positive
    alpha, beta = comm.fit_alpha_beta([1024, 4096, 16384, 65536], [3e-4, 3e-4, 5e-4, 4e-4])
    assert beta == pytest.approx(65536 / 4e-4)
    assert alpha > 0


def test_sizes_default_to_the_backend():
    assert comm.CommBenchConfig().sizes() == [1024 * 4**i for i in range(9)]  # 1 KiB .. 64 MiB on gloo
    assert comm.CommBenchConfig(max_bytes=65536, factor=2).sizes() == [1024 * 2**i for i in range(7)]


@pytest.mark.parametrize("kwargs", [dict(backend="mpi"), dict(world_size=1), dict(min_bytes=1001),
                                    dict(max_bytes=512), dict(max_bytes=4096), dict(factor=1), dict(iters=0),
                                    dict(warmup=-1), dict(rounds=0), dict(fit_small=9),
                                    dict(backend="nccl", world_size=64)])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        comm.CommBenchConfig(**kwargs)
