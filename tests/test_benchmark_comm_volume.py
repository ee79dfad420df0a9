"""benchmarks/comm_volume.py: measured bytes per rank equal the formula for ring, Ulysses and hybrid."""

from __future__ import annotations

import re

import pytest

from benchmarks import comm_volume


def test_measured_volume_equals_the_formula(tmp_path):
    md = comm_volume.main(["--world-size", "4", "--seqlen", "64", "--heads", "4", "--kv-heads", "1",
                           "--headdim", "8", "--windows", "4,16,40", "--out-dir", tmp_path])
    lines = md.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and re.fullmatch(r"\d+ x \d+", line.split("|")[2].strip())]
    assert [row.split("|")[1].strip() for row in rows] == ["ring", "ulysses", "hybrid"]
    assert all(row.rstrip(" |").endswith("measured == formula") for row in rows), rows
    windows = [line.split("|")[1:-1] for line in lines if line.startswith("| contiguous") or line.startswith("| zigzag")]
    assert len(windows) == 2 * 4 and all(cells[-1].strip() == "measured == formula" for cells in windows), windows
    hops = {(cells[0].strip(), cells[1].strip()): cells[2].strip() for cells in windows}
    # 16 tokens per rank: a 4-token window needs the previous block only (zigzag: and the next rank's)
    assert hops[("contiguous", "none")] == "3/0" and hops[("contiguous", "4")] == "1/0"
    assert hops[("zigzag", "4")] == "1/1" and hops[("contiguous", "40")] == "3/0"


def test_formula_by_hand():
    cfg = comm_volume.VolumeConfig(world_size=4, seqlen=64, heads=4, kv_heads=1, headdim=8)
    tokens = 1 * 16 * 8  # B * L * D with L = 64 / 4
    assert comm_volume.formula(cfg, 1, 4) == (3 * 2 * tokens * 4, 3 * 2 * tokens * 4 + 4 * 2 * tokens * 4)
    # Ulysses 4: the one K/V head is replicated to 4; 3/4 of q, k, v (and out) leave the rank
    assert comm_volume.formula(cfg, 4, 1) == (3 * tokens * 4 * (8 + 8) // 4,) * 2
    # a causal 4-token window: one hop forward; the accumulator goes one hop and straight back home
    assert comm_volume.window_formula(cfg, "contiguous", 4) == ((1, 0), 2 * tokens * 4, 2 * tokens * 4 + 2 * 2 * tokens * 4)


@pytest.mark.parametrize("kwargs", [dict(world_size=3), dict(seqlen=63), dict(heads=6), dict(dtype="int8"),
                                    dict(windows="8,x"), dict(windows="-1")])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        comm_volume.VolumeConfig(**kwargs)
