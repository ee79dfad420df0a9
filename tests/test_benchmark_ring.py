"""CPU smoke test of benchmarks/ring_cpu.py: it spawns its gloo worlds, writes its markdown result with
finite times for every world, counts the ring's bytes exactly as the formula says, and rejects bad configs."""

import math

import pytest

from benchmarks import ring_cpu as bench

TINY = ["--worlds", "1", "2", "--seqlens", "64", "--iters", "1", "--warmup", "0", "--timeout-s", "120"]


def _rows(text):
    """Cells of the result table's data rows, keyed by the header."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.timeout(120)
def test_cpu_smoke_writes_result(tmp_path):
    argv = TINY + ["--out-dir", str(tmp_path)]
    md = bench.main(argv)

    assert md == tmp_path / "ring_cpu.md" and md.exists(), f"no result file in {list(tmp_path.iterdir())}"
    text = md.read_text()
    assert "- machine: CPU" in text, text
    assert "- command: `python -m benchmarks.ring_cpu " + " ".join(argv) + "`" in text, text
    rows = _rows(text)
    assert [r["world"] for r in rows] == ["1", "2"], text
    for r in rows:
        assert (r["layout"], r["causal"], r["seqlen"]) == ("zigzag", "true", "64"), r
        for col in ("fwd ms", "bwd ms", "single fwd ms", "single bwd ms", "ratio fwd+bwd"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, f"{col}: {r[col]} in {r}"
        assert r["bytes"] == "measured == formula", r
    # the bytes themselves, from first principles: world 2, 32 tokens per rank, 2 kv heads, headdim 64, fp32
    kv = 2 * 1 * 32 * 2 * 64 * 4
    world1, world2 = rows
    assert world1["fwd bytes/rank measured"] == "0 (0 msgs)" and world1["bwd bytes/rank measured"] == "0 (0 msgs)"
    assert world2["fwd bytes/rank measured"] == f"{kv} (1 msgs)", world2
    assert world2["bwd bytes/rank measured"] == f"{3 * kv} (3 msgs)", world2  # 1 KV + 2 dK/dV accumulators
    assert world2["bwd formula"] == f"1 x {kv} + 2 x {kv} = {3 * kv}", world2
    assert "measured == formula for every row" in text


def test_bytes_mismatch_is_reported(monkeypatch):
    """The check can fail: a formula that is off by one message turns the row into MISMATCH."""
    cfg = bench.RingBenchConfig(worlds=[2], seqlens=[8])
    fwd, bwd = bench.formula(cfg, 2, 8)
    assert bench._flat(fwd) == [2 * 4 * 2 * 64 * 4] and len(bench._flat(bwd)) == 3
    rows = [dict(world=2, layout="zigzag", causal=True, seqlen=8, threads=1, fwd=1.0, bwd=1.0, single_fwd=1.0,
                 single_bwd=1.0, ratio_fwd=1.0, ratio_bwd=1.0, ratio=1.0, fwd_sent=[1], bwd_sent=[1],
                 fwd_formula=fwd, bwd_formula=bwd, bytes_ok=False)]
    text = bench.report(cfg, rows, [], 0.0)
    assert _rows(text)[0]["bytes"] == "MISMATCH" and "MISMATCH in some rows" in text, text


@pytest.mark.parametrize("kwargs, field", [
    (dict(worlds=[4], seqlens=[12]), "seqlens"),                       # zigzag needs 2 * world = 8 | seqlen
    (dict(worlds=[3], seqlens=[9], layouts=["striped"]), None),        # striped needs only world | seqlen
    (dict(worlds=[0]), "worlds"), (dict(layouts=["spiral"]), "layouts"), (dict(kv_heads=3), "kv_heads"),
    (dict(iters=0), "iters"), (dict(threads_per_rank=0), "threads_per_rank")])
def test_config_validation(kwargs, field):
    if field is None:
        bench.RingBenchConfig(**kwargs)
        return
    with pytest.raises(ValueError, match=field):
        bench.RingBenchConfig(**kwargs)


def test_cli_rejects_bad_seqlen(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--worlds", "2", "--seqlens", "6"])
    assert "seqlens" in capsys.readouterr().err
