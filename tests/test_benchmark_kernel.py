"""CPU smoke test of benchmarks/kernel.py: it runs end to end, writes its markdown result with real
numbers for our kernel, reports broken providers instead of crashing, and rejects bad configs."""

import math
import re

import pytest
import torch

from benchmarks import kernel as bench

TINY = ["--device", "cpu", "--seqlens", "128", "--headdims", "32", "--batch", "1", "--heads", "2",
        "--reps", "1", "--warmup", "0", "--causal", "true"]


def _rows(text, provider):
    """Cells of the main table's rows for ``provider`` (the ratio table has a 'mode' column instead)."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if len(r) == 10 and r[3] == provider]


def test_cpu_smoke_writes_result(tmp_path, monkeypatch):
    def broken(q, k, v, causal):
        raise RuntimeError("provider deliberately broken")

    def oom(q, k, v, causal):
        raise torch.OutOfMemoryError("pretend out of memory")

    real = bench.providers
    monkeypatch.setattr(bench, "providers", lambda cfg: {**real(cfg), "broken": broken, "oom-one": oom})
    argv = TINY + ["--out-dir", str(tmp_path), "--tag", "smoke"]
    md = bench.main(argv)

    assert md == tmp_path / "kernel_smoke.md" and md.exists(), f"no result file in {list(tmp_path.iterdir())}"
    text = md.read_text()
    assert "- device: CPU" in text, text
    assert "- command: `python -m benchmarks.kernel " + " ".join(argv) + "`" in text, text
    ours = _rows(text, "ours-torch")
    assert len(ours) == 1, text
    headdim, causal, seqlen, _, *cells = ours[0]
    assert (headdim, causal, seqlen) == ("32", "true", "128"), ours
    for mode, ms, tflops in zip(("fwd", "bwd", "fwd+bwd"), cells[0::2], cells[1::2]):
        assert math.isfinite(float(ms)) and float(ms) > 0, f"{mode}: {ms} ms in {ours}"
        assert math.isfinite(float(tflops)) and float(tflops) > 0, f"{mode}: {tflops} TFLOP/s in {ours}"
        # the TFLOP/s column follows from the time and the FLOP formula in the docstring
        factor = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]
        expected = 4 * 1 * 2 * 128 * 128 * 32 / 2 * factor / float(ms) / 1e9
        assert float(tflops) == pytest.approx(expected, rel=2e-3), (mode, tflops, expected)
    assert _rows(text, "broken")[0][4:] == ["n/a"] * 6, text
    assert _rows(text, "oom-one")[0][4:] == ["oom"] * 6, text
    assert "broken: n/a: RuntimeError: provider deliberately broken" in text
    ratio_rows = [line for line in text.splitlines() if re.match(r"\| 32 \| true \| 128 \| fwd \| ours-torch", line)]
    assert len(ratio_rows) == 1, text


@pytest.mark.parametrize("field, value", [("seqlens", [0]), ("dtype", "fp8"), ("heads", 0), ("kv_heads", 3),
                                          ("modes", ["sideways"]), ("headdims", [512]), ("device", "tpu")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        bench.BenchConfig(device="cpu", **{field: value}) if field != "device" else bench.BenchConfig(device=value)


def test_cli_rejects_bad_values(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--seqlens", "0"])
    assert "seqlens" in capsys.readouterr().err


def test_config_defaults_on_cpu():
    cfg = bench.BenchConfig(device="cpu")
    assert (cfg.dtype, cfg.kv_heads, cfg.tag, cfg.causal) == ("fp32", cfg.heads, "cpu", [False, True])
