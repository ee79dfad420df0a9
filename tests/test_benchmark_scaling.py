"""benchmarks/scaling.py: the cost model against hand-computed cases, exact byte counts and a smoke run."""

import math

import pytest
import torch

from benchmarks import scaling as sc
from benchmarks.comm_volume import formula as volume_formula
from dist_attn.layouts import segments
from dist_attn.ring import visible_pairs


def hw(fwd=4e6, bwd=1e7, alpha=0.0, beta=1e6, overhead=0.0):
    link = sc.Link("test", alpha, beta)
    return sc.Hardware("test", fwd, bwd, link, link, 8, overhead)


TINY = sc.Shape(batch=1, heads=1, kv_heads=1, headdim=1, dtype="float32", causal=False)


def test_compute_bound_ring_step():
    # L = 1000, non-causal: 1e6 pairs * 4 FLOPs / 4e6 FLOP/s = 1 s fwd per step; bwd 2.5 * 4e6 / 1e7 = 1 s.
    # K/V message 2*1000*4 = 8000 bytes at 1e6 B/s = 8 ms: hidden behind compute.
    r = sc.model("ring-contiguous", TINY, hw(overhead=0.1), 2000, 2)
    assert r["fwd"] == pytest.approx(2 * (1.0 + 0.1))
    assert r["bwd"] == pytest.approx(2 * (1.0 + 0.1) + 0.008)   # + the last dK/dV hop after the last kernel
    assert sc.model("ring-zigzag", TINY, hw(beta=1e12), 2000, 2)["efficiency"] == pytest.approx(1.0, rel=1e-6)


def test_transfer_bound_ring_step():
    # beta 1e3 B/s, alpha 0.5 s: one 8000-byte K/V (or fp32 dK/dV) message takes 8.5 s > 1 s of compute.
    r = sc.model("ring-contiguous", TINY, hw(alpha=0.5, beta=1e3), 2000, 2)
    assert r["fwd"] == pytest.approx(8.5 + 1.0)                   # step 0 sends, step 1 only computes
    assert r["bwd"] == pytest.approx(8.5 + 8.5 + 8.5)             # kv | dkv | last dkv hop
    single = 4.0 + 4.0       # the whole 2000^2 pairs on one device: 4 s fwd + 4 s bwd
    assert r["efficiency"] == pytest.approx(single / (2 * (9.5 + 25.5)))


def test_hierarchical_hand_case():
    # 2 nodes x 2 GPUs, L = 1000 tokens per GPU, non-causal, 1 head, D 1, bf16, overhead 0.1 s.
    # kernel per step: 1e6 pairs * 4 / 4e6 = 1 s fwd; 1e6 * 4 * 2.5 / 1e7 = 1 s bwd.
    # K/V message 2*1000*2 = 4000 B, fp32 dK/dV 8000 B.
    # NVLink-like (alpha 0, 1e5 B/s): K/V 0.04 s, dK/dV 0.08 s (hidden behind 1 s of compute).
    # IB-like (alpha 0.5 s, 2e3 B/s): K/V 0.5 + 2 = 2.5 s, dK/dV 0.5 + 4 = 4.5 s.
    shape = sc.Shape(batch=1, heads=1, kv_heads=1, headdim=1, dtype="bfloat16", causal=False)
    h = sc.Hardware("t", 4e6, 1e7, sc.Link("nv", 0.0, 1e5), sc.Link("ib", 0.5, 2e3), 2, 0.1)
    # flat (w = 4 > 2 per node: every hop at the IB rate), per step:
    #   fwd: steps 0-2 max(1, 2.5) + 0.1 = 2.6, step 3 1 + 0.1 = 1.1                        -> 8.9
    #   bwd: step 0 max(1, 2.5) + 0.1 = 2.6, steps 1-2 max(1, 2.5 + 4.5) + 0.1 = 7.1,
    #        step 3 max(1, 4.5) + 0.1 = 4.6, last dK/dV hop 4.5                            -> 25.9
    flat = sc.model("ring-zigzag", shape, h, 4000, 4)
    assert (flat["fwd"], flat["bwd"]) == (pytest.approx(8.9), pytest.approx(25.9))
    # hierarchical, inner ring of 2 over NVLink: each inner step max(1, 0.04 or 0.08) + 0.1 = 1.1 -> 2.2 per outer
    #   fwd: outer 0 max(2.2, IB K/V 2.5) = 2.5, outer 1 max(2.2, none) = 2.2                -> 4.7
    #   bwd: outer 0 max(2.2, 2.5) = 2.5, outer 1 max(2.2, IB dK/dV 4.5) = 4.5, + last IB dK/dV hop 4.5 -> 11.5
    fwd, bwd, tail = sc.hierarchical_steps(shape, h, 4, 1000, 4000)
    assert fwd == [pytest.approx(2.5), pytest.approx(2.2)]
    assert bwd == [pytest.approx(2.5), pytest.approx(4.5)] and tail == pytest.approx(4.5)
    hier = sc.model("ring-hierarchical", shape, h, 4000, 4)
    assert (hier["fwd"], hier["bwd"]) == (pytest.approx(4.7), pytest.approx(11.5))
    single = 16.0 + 16.0     # 16e6 pairs on one device: 16 s fwd + 16 s bwd
    assert flat["efficiency"] == pytest.approx(single / (4 * (8.9 + 25.9)))
    assert hier["efficiency"] == pytest.approx(single / (4 * (4.7 + 11.5)))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_hierarchical_one_node_is_flat(world, causal):
    shape = sc.Shape(causal=causal)
    gpu = sc.Hardware("g", 350e12, 250e12, sc.NVLINK, sc.INFINIBAND, 8, 20e-6)
    for L in (512, 8192):
        flat = sc.model("ring-zigzag", shape, gpu, L * world, world)
        hier = sc.model("ring-hierarchical", shape, gpu, L * world, world)
        for k in ("fwd", "bwd", "efficiency"):
            assert hier[k] == pytest.approx(flat[k], rel=1e-12), k
    counts = sc.hierarchical_pair_counts("zigzag", 1, world, 16, causal)
    assert (counts[0] == sc.pair_counts("zigzag", world, 16, causal)).all()


@pytest.mark.parametrize("nodes,g", [(2, 2), (3, 2), (2, 4)])
def test_hierarchical_schedule_visits_every_block_once(nodes, g):
    # every rank meets every K/V block exactly once: per-rank totals and per-(rank, source) work as the flat ring
    w, L = nodes * g, 8
    hier = sc.hierarchical_pair_counts("zigzag", nodes, g, L, True).reshape(w, w)
    flat = sc.pair_counts("zigzag", w, L, True)
    assert (hier.sum(axis=0) == flat.sum(axis=0)).all()
    assert sorted(hier[1:].ravel().tolist()) == sorted(flat[1:].ravel().tolist())   # zigzag: all off-diagonal equal
    assert sc.model("ring-hierarchical", sc.Shape(), hw(), 64 * 12, 12) is None       # 12 % 8 GPUs per node
    assert sc.model("ring-hierarchical", sc.Shape(), hw(), 64 * 16, 16) is not None


def test_hierarchical_beats_flat_across_nodes():
    shape = sc.Shape()   # Llama-3-8B-like: 32/8 heads, D 128, bf16, causal
    gpu = sc.Hardware("g", 350e12, 250e12, sc.NVLINK, sc.INFINIBAND, 8, 20e-6)
    for L in (1024, 2048, 8192, 32768):
        for nodes in (2, 4, 16, 64):
            w = 8 * nodes
            flat = sc.model("ring-zigzag", shape, gpu, L * w, w)
            hier = sc.model("ring-hierarchical", shape, gpu, L * w, w)
            assert hier["efficiency"] >= flat["efficiency"] * (1 - 1e-12), (L, nodes)
            assert hier["memory"] > flat["memory"]                  # the inter-node prefetch buffers
    # short blocks: the flat ring waits on InfiniBand at every step, the hierarchical ring once per node
    w = 8 * 16
    assert sc.model("ring-hierarchical", shape, gpu, 2048 * w, w)["efficiency"] > \
        1.4 * sc.model("ring-zigzag", shape, gpu, 2048 * w, w)["efficiency"]
    # a slower inter-node link hurts the flat ring far more than the hierarchical one
    slow = sc.Hardware("g", 350e12, 250e12, sc.NVLINK, sc.Link("ib", 20e-6, 12.5e9), 8, 20e-6)
    assert sc.model("ring-hierarchical", shape, slow, 8192 * w, w)["efficiency"] > \
        1.2 * sc.model("ring-zigzag", shape, slow, 8192 * w, w)["efficiency"]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_bytes_equal_comm_volume_formula(world):
    # time == bytes (alpha 0, beta 1 B/s) and free compute: the modelled times are the bytes one rank sends
    shape = sc.Shape(batch=2, heads=4, kv_heads=2, headdim=8, dtype="bfloat16", causal=True)
    h = hw(fwd=1e30, bwd=1e30, beta=1.0)
    N = 24 * world
    cfg = sc._volume_cfg(shape, N, world)
    fwd, bwd = volume_formula(cfg, 1, world)
    r = sc.model("ring-contiguous", shape, h, N, world)
    assert (r["fwd"], r["bwd"]) == (pytest.approx(fwd), pytest.approx(bwd))
    L = N // world   # the brief's backward count: (w-1) K/V + w fp32 dK/dV messages
    assert bwd == (world - 1) * 2 * 2 * L * 2 * 8 * 2 + world * 2 * 2 * L * 2 * 8 * 4


def test_ulysses_all_to_all_bytes():
    shape = sc.Shape(batch=1, heads=8, kv_heads=2, headdim=16, dtype="bfloat16", causal=True)
    # (u-1)/u * B*L*D*e * (2H + 2Hk'), L = 256, Hk' = max(2, 4) = 4
    assert sc.all_to_all_bytes(shape, 1024, 4, 4) == 3 * 256 * 16 * 2 * (16 + 8) // 4 == 147456
    assert sc.all_to_all_bytes(shape, 1024, 4, 4) == volume_formula(sc._volume_cfg(shape, 1024, 4), 4, 1)[0]
    r = sc.model("ulysses", shape, hw(fwd=1e30, bwd=1e30, beta=1.0), 1024, 4)
    assert r["fwd"] == pytest.approx(147456) and r["bwd"] == pytest.approx(147456)
    assert sc.model("ulysses", shape, hw(), 1024, 16) is None   # 16 does not divide 8 heads


def test_hidden_block_length_hand_case():
    shape = sc.Shape(batch=1, heads=1, kv_heads=1, headdim=1, dtype="float32", causal=True)
    link = sc.Link("t", 0.0, 1e3)
    # causal fwd compute L^2/2 * 4 / 4e6, transfer 2*L*4 / 1e3: equal at L = 16000 (128 s each)
    L = sc.hidden_block_length(shape, hw(), link, bwd=False)
    assert L == pytest.approx(16000)
    assert L * L / 2 * 4 / 4e6 == pytest.approx(2 * L * 4 / 1e3)
    link = sc.Link("t", 3.0, 1e3)
    for bwd in (False, True):
        L = sc.hidden_block_length(shape, hw(), link, bwd)
        compute = L * L / 2 * 4 * (2.5 if bwd else 1) / (1e7 if bwd else 4e6)
        transfer = 3.0 + 2 * L * (4 + (4 if bwd else 0)) / 1e3
        assert compute == pytest.approx(transfer)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_pair_counts_match_visible_pairs(layout, world, causal):
    L = 8
    counts = sc.pair_counts(layout, world, L, causal)
    for rank in range(world):
        for step in range(world):
            src = (rank - step) % world
            brute = 0
            for q_seg, k_seg in visible_pairs(layout, rank, src, world, L, causal, None):
                qpos = q_seg.offset + q_seg.stride * torch.arange(q_seg.length)
                kpos = k_seg.offset + k_seg.stride * torch.arange(k_seg.length)
                brute += int((kpos[None, :] <= qpos[:, None]).sum()) if causal else q_seg.length * k_seg.length
            assert counts[step, rank] == brute, (rank, step)
    assert len(segments(layout, 0, world, L)) >= 1


def test_balanced_layouts_and_contiguous_critical_path():
    z = sc.pair_counts("zigzag", 8, 64, True)
    assert (z[1:] == z[1:, :1]).all()                      # every rank the same work after the diagonal step
    c = sc.pair_counts("contiguous", 8, 64, True)
    assert c.max(axis=1)[1:].tolist() == [64 * 64] * 7     # the last rank sees a full block at every step
    shape = sc.Shape(1, 1, 1, 1, "float32", True)
    eff = sc.model("ring-contiguous", shape, hw(beta=1e15), 64 * 1024, 1024)["efficiency"]
    assert eff == pytest.approx(0.5, abs=0.01)


def test_gpu_kernel_result(tmp_path):
    assert sc.gpu_kernel_result(tmp_path) is None
    (tmp_path / "kernel_h100.md").write_text(
        "| headdim | causal | seqlen | mode | ours | TFLOP/s | best baseline | TFLOP/s | ratio |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
        "| 128 | true | 4096 | fwd | ours-triton | 300.5 | fa2 | 310 | 0.97 |\n"
        "| 128 | true | 16384 | fwd | ours-triton | 320.0 | fa2 | 330 | 0.97 |\n"
        "| 128 | true | 16384 | bwd | ours-triton | 210.0 | fa2 | 220 | 0.95 |\n"
        "| 128 | false | 16384 | bwd | ours-triton | 999.0 | fa2 | 220 | 0.95 |\n")
    assert sc.gpu_kernel_result(tmp_path) == (320.0, 210.0, "kernel_h100.md")


def test_config_validation():
    with pytest.raises(ValueError):
        sc.ScalingConfig(max_world=12)
    with pytest.raises(ValueError):
        sc.ScalingConfig(validate_worlds=[4], validate_seqlen=12)
    with pytest.raises(ValueError):
        sc.Shape(heads=6, kv_heads=4)
    with pytest.raises(ValueError):
        sc.Link("x", 0.0, 0.0)


def test_smoke_run(tmp_path):
    md = sc.main(["--tag", "smoke", "--out-dir", tmp_path, "--max-world", 16, "--weak-block", 1024,
                  "--strong-seqlens", 4096, 65536, "--cpu-throughput-seqlens", 64, "--validate-worlds", 1, 2,
                  "--validate-seqlen", 64, "--validate-iters", 1, "--validate-warmup", 0])
    text = md.read_text()
    assert md == tmp_path / "scaling_smoke.md"
    assert "MODELLED" in text and "ASSUMED" in text and "PENDING" in text and "MEASURED" in text
    assert "| ring-zigzag |" in text and "## Validation" in text
    pytest.importorskip("matplotlib")
    assert (tmp_path / "scaling_smoke.png").stat().st_size > 0
    hier = (tmp_path / "scaling_smoke_hierarchical.md").read_text()
    assert "MODELLED" in hier and "ASSUMED" in hier and "| 128 | 1024 |" in hier and "32K/GPU hier" in hier
    assert "| ring-hierarchical |" in text
    assert (tmp_path / "scaling_smoke_hierarchical.png").stat().st_size > 0
    assert not math.isnan(sc.hidden_block_length(sc.Shape(), sc.Hardware("g", 1e14, 1e14, sc.NVLINK, sc.INFINIBAND),
                                                 sc.NVLINK, True))
