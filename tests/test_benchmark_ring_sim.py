"""CPU smoke test of benchmarks/ring_sim.py: the one-device ring simulation writes its table with a row per
(world, layout, causal), its exact pair counts give the balance the layouts promise, and its forward (and
gradients) are the real computation: they equal the full-sequence kernel."""

import math

import pytest
import torch

from benchmarks import ring_sim as bench
from dist_attn.layouts import LAYOUTS, segments
from dist_attn.kernels import flash_attn_func

TINY = ["--device", "cpu", "--worlds", "1", "2", "4", "--seqlen", "64", "--headdim", "16", "--reps", "1",
        "--warmup", "0"]


def _rows(text):
    """Cells of the result table's data rows, keyed by the header."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.mark.timeout(60)
def test_cpu_smoke_writes_result(tmp_path):
    argv = TINY + ["--out-dir", str(tmp_path)]
    md = bench.main(argv)

    assert md == tmp_path / "ring_sim_cpu.md" and md.exists(), f"no result file in {list(tmp_path.iterdir())}"
    text = md.read_text()
    assert "- device: CPU" in text and "- command: `python -m benchmarks.ring_sim " + " ".join(argv) + "`" in text
    assert "measured on this device" in text, text
    rows = {(r["world"], r["layout"], r["causal"]): r for r in _rows(text)}
    assert sorted(rows) == sorted((w, l, c) for w in ("1", "2", "4") for l in LAYOUTS for c in ("true", "false"))
    for r in rows.values():
        for col in ("single fwd ms", "ring fwd ms", "ring bwd ms", "ratio fwd+bwd", "critical path ms"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, f"{col}: {r[col]} in {r}"
        assert r["pairs sum == full"] == "true", r
        assert float(r["max abs diff"]) < 1e-4, r  # simulated out/dq/dk/dv vs the full-sequence kernel (fp32)
    # FLOP-based (exact pair count) balance: deterministic, so it can be asserted
    for layout in ("zigzag", "striped"):
        assert float(rows[("4", layout, "true")]["balance pairs max/mean"]) <= 1.05, rows[("4", layout, "true")]
    assert float(rows[("4", "contiguous", "true")]["balance pairs max/mean"]) > 1.5  # (2w-1)/w = 1.75 ideally
    for layout in LAYOUTS:  # non-causal: every rank sees every key
        assert float(rows[("4", layout, "false")]["balance pairs max/mean"]) == 1.0
    assert (tmp_path / "ring_sim_cpu.png").exists()


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_simulated_forward_is_full_attention(layout, causal):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 48, h, 16, generator=gen) for h in (4, 2, 2))
    ref = flash_attn_func(q, k, v, causal=causal, backend="torch")
    for world in (1, 2, 4) if layout != "zigzag" else (1, 2, 3):
        out = bench.simulate_forward(q, k, v, causal=causal, layout=layout, world=world, backend="torch")
        assert out.shape == q.shape and out.dtype == torch.float32
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=0, msg=f"{layout} world {world} causal {causal}")


def test_simulated_gradients_are_full_gradients():
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 32, h, 16, generator=gen) for h in (4, 2, 2, 4))
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    flash_attn_func(qr, kr, vr, causal=True, backend="torch").backward(dout)
    sim = bench.simulate(q, k, v, dout, True, "zigzag", 4, backend="torch")
    for name, ref in (("dq", qr.grad), ("dk", kr.grad), ("dv", vr.grad)):
        torch.testing.assert_close(sim[name], ref, atol=1e-4, rtol=0, msg=name)


def test_visible_count_matches_brute_force():
    for layout in LAYOUTS:
        for world in (2, 3):
            local = 6
            for r in range(world):
                for s in range(world):
                    for qs in segments(layout, r, world, local):
                        for ks in segments(layout, s, world, local):
                            qp = torch.tensor([qs.positions.at(i) for i in range(qs.length)])
                            kp = torch.tensor([ks.positions.at(j) for j in range(ks.length)])
                            for causal, window in ((True, None), (False, None), (False, (2, 1)), (True, (3, 0))):
                                mask = torch.ones(len(qp), len(kp), dtype=torch.bool)
                                if causal:
                                    mask &= kp[None] <= qp[:, None]
                                if window is not None:
                                    left, right = window
                                    mask &= (kp[None] >= qp[:, None] - left) & (kp[None] <= qp[:, None] + right)
                                assert bench.visible_count(qs, ks, causal, window) == int(mask.sum())


@pytest.mark.parametrize("kwargs, field", [
    (dict(worlds=[4], seqlen=12), "seqlen"),                          # zigzag needs 2 * world = 8 | seqlen
    (dict(worlds=[3], seqlen=9, layouts=["striped"]), None),          # striped needs only world | seqlen
    (dict(worlds=[0]), "worlds"), (dict(layouts=["spiral"]), "layouts"), (dict(kv_heads=3), "kv_heads"),
    (dict(reps=0), "reps"), (dict(dtype="int8"), "dtype"), (dict(seqlen=64, tokens_per_rank=[8]), "seqlen"),
    (dict(tokens_per_rank=[0]), "tokens_per_rank"), (dict(device="tpu"), "device")])
def test_config_validation(kwargs, field):
    kwargs = dict(device="cpu") | kwargs
    if field is None:
        bench.RingSimConfig(**kwargs)
        return
    with pytest.raises(ValueError, match=field):
        bench.RingSimConfig(**kwargs)


def test_cpu_defaults():
    cfg = bench.RingSimConfig(device="cpu")
    assert (cfg.worlds, cfg.seqlen, cfg.heads, cfg.kv_heads, cfg.headdim, cfg.dtype, cfg.backend, cfg.reps) == \
        ([1, 2, 4, 8], 2048, 8, 2, 64, "float32", "torch", 3)
    assert len(cfg.cases()) == 4 * 3 * 2


def test_cli_rejects_bad_seqlen(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--worlds", "2", "--seqlen", "6"])
    assert "seqlen" in capsys.readouterr().err
