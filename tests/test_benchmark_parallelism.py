"""benchmarks/parallelism.py: the pp x tp x cp x dp cost model against hand-computed cases, brute-force
enumeration and monotonic sanity checks (no process groups)."""

import dataclasses
import itertools

import pytest
import torch

from benchmarks import parallelism as pa
from benchmarks import scaling as sc

LLAMA = pa.Transformer()
# layers 4, dim 8, 2 heads of 4 (1 KV head per head), MLP 16, vocab 32: per layer W = 2*8*8 + 2*8*8 + 3*8*16 = 640
TINY = pa.Transformer(layers=4, dim=8, heads=2, kv_heads=2, headdim=4, ffn=16, vocab=32)


def cluster(beta=1.0, inter_beta=0.5, alpha=0.0, matmul=1e30, attention=1e30, gpus_per_node=4, peak=1.0,
            memory=80e9, overhead=0.0):
    hw = sc.Hardware("t", attention, attention, sc.Link("nv", alpha, beta), sc.Link("ib", alpha, inter_beta),
                     gpus_per_node, overhead)
    return pa.Cluster(hw, matmul, peak, memory)


@pytest.mark.parametrize("b,L,dim,dtype", [(2, 3, 5, torch.bfloat16), (1, 4096, 4096, torch.bfloat16),
                                           (3, 7, 16, torch.float32)])
def test_stage_boundary_bytes_equal_real_tensors(b, L, dim, dtype):
    hidden, positions = torch.empty(b, L, dim, dtype=dtype), torch.empty(L, dtype=torch.int64)
    got = pa.stage_boundary_bytes(b, L, dim, hidden.element_size())
    h = hidden.numel() * hidden.element_size()
    assert got == {"forward": h + positions.numel() * positions.element_size(), "backward": h}


def test_stage_boundary_bytes_hand_case():
    # (2, 3, 5) bf16 hidden = 60 bytes, 3 int64 positions = 24 bytes
    assert pa.stage_boundary_bytes(2, 3, 5, 2) == {"forward": 84, "backward": 60}
    assert pa.stage_boundary_bytes(2, 3, 5, 2, position_bytes=4) == {"forward": 72, "backward": 60}
    with pytest.raises(ValueError, match="tokens_per_rank"):
        pa.stage_boundary_bytes(1, 0, 5, 2)


def test_pipeline_bubble():
    assert pa.pipeline_bubble(1, 1) == 0.0
    assert pa.pipeline_bubble(4, 8) == pytest.approx(3 / 8)
    assert pa.pipeline_bubble(8, 1) == pytest.approx(7.0)


@pytest.mark.parametrize("stages,micro_batches,name", [(0, 4, "stages"), (2, 0, "micro_batches"), (2.0, 4, "stages"),
                                                       (2, True, "micro_batches"), (-1, 4, "stages")])
def test_pipeline_bubble_rejects(stages, micro_batches, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        pa.pipeline_bubble(stages, micro_batches)


def test_llama_parameter_count():
    assert LLAMA.params == 8_030_261_248                 # Llama-3-8B's published parameter count
    assert TINY.params == 4 * (640 + 16) + 2 * 32 * 8 + 8


def brute_force_layouts(gpus, layers, kv_heads, tokens, global_batch, gpus_per_node=8):
    return {(pp, tp, cp, gpus // (pp * tp * cp)) for pp, tp, cp in itertools.product(range(1, gpus + 1), repeat=3)
            if gpus % (pp * tp * cp) == 0 and gpus_per_node % tp == 0 and kv_heads % tp == 0 and layers % pp == 0
            and global_batch % (gpus // (pp * tp * cp)) == 0 and tokens % (2 * cp) == 0}


def as_tuples(layouts):
    return {(x.pp, x.tp, x.cp, x.dp) for x in layouts}


@pytest.mark.parametrize("gpus,global_batch", [(64, 64), (48, 12), (16, 8)])
def test_configurations_are_exactly_the_feasible_factorisations(gpus, global_batch):
    got = pa.configurations(gpus, LLAMA, 131072, global_batch)
    assert len(got) == len(as_tuples(got))
    assert as_tuples(got) == brute_force_layouts(gpus, 32, 8, 131072, global_batch)
    assert all(x.gpus == gpus for x in got)


def test_configurations_exclusions():
    got = as_tuples(pa.configurations(64, LLAMA, 131072, 64))
    assert (1, 1, 64, 1) in got and (1, 8, 8, 1) in got and (32, 1, 2, 1) in got
    assert (64, 1, 1, 1) not in got                      # more stages than layers
    assert {x[1] for x in got} == {1, 2, 4, 8}
    # 16 GPUs per node would allow tp 16, but it does not divide the 8 KV heads
    wide = pa.configurations(64, LLAMA, 131072, 64, gpus_per_node=16)
    assert {x.tp for x in wide} == {1, 2, 4, 8}
    assert "KV heads" in pa.infeasible(pa.Layout(1, 16, 4, 1), LLAMA, 131072, 64, gpus_per_node=16)
    # 4 KV heads: tp 8 is out
    four = dataclasses.replace(LLAMA, kv_heads=4)
    assert {x.tp for x in pa.configurations(64, four, 131072, 64)} == {1, 2, 4}
    # 48 GPUs: tp 3 and 6 divide neither the KV heads nor the 8 GPUs of a node
    assert {x.tp for x in pa.configurations(48, LLAMA, 131072, 48)} == {1, 2, 4, 8}
    assert "global batch" in pa.infeasible(pa.Layout(1, 1, 1, 64), LLAMA, 131072, 32)
    assert "zigzag" in pa.infeasible(pa.Layout(1, 1, 64, 1), LLAMA, 64, 64)
    with pytest.raises(ValueError, match="layers"):
        pa.step(LLAMA, cluster(), pa.Layout(3, 1, 1, 1), 131072, 3)


def test_tp_all_reduce_bytes_hand_case():
    # compute free, NVLink 1 B/s, alpha 0: time = bytes on the critical path.
    # 16 tokens: hidden 16*8*2 = 256 bytes; a 2-rank ring all-reduce moves 2*(1/2)*256 = 256 bytes per rank.
    # per slot 4 all-reduces per layer * 4 layers + embedding + LM head = 18; m = 3 micro-batches.
    r = pa.step(TINY, cluster(), pa.Layout(1, 2, 1, 1), 16, 3)
    assert r["m"] == 3 and r["bubble"] == 0.0
    assert r["time"] == pytest.approx(3 * 18 * 256)
    assert r["terms"]["tp"] == pytest.approx(3 * 18 * 256)


@pytest.mark.parametrize("gpus_per_node,beta", [(4, 1.0), (1, 0.5)])
def test_pipeline_boundary_hand_case(gpus_per_node, beta):
    # 2 stages: stage 0 sends 256 + 16*8 = 384 bytes forward, stage 1 sends 256 back; the slowest slot is 384
    # bytes at 1 B/s on one node (span 2 <= 4 GPUs), 0.5 B/s over InfiniBand with 1 GPU per node.
    # 1F1B with m = 3: (3 + 2 - 1) slots.
    r = pa.step(TINY, cluster(gpus_per_node=gpus_per_node), pa.Layout(2, 1, 1, 1), 16, 3)
    assert r["bubble"] == pytest.approx(1 / 3)
    assert r["time"] == pytest.approx(4 * 384 / beta)
    assert r["terms"]["bubble"] == pytest.approx(384 / beta)


def test_gradient_reduction_hand_case():
    # dp 2, one stage: every parameter (3144) reduce-scattered in fp32 and all-gathered in bf16: (1/2) * 3144 * 6
    r = pa.step(TINY, cluster(), pa.Layout(1, 1, 1, 2), 16, 2)
    assert r["m"] == 1
    assert r["time"] == pytest.approx(3144 * 6 / 2)
    assert r["terms"]["grad"] == pytest.approx(3144 * 6 / 2)


def test_matmul_time_and_mfu_hand_case():
    # 1 FLOP/s, free links and attention. Per micro-batch of 16 tokens: a layer 6*640*16 = 61440, LM head
    # 6*32*8*16 = 24576. 2 stages of 2 layers: slowest (last) 2*61440 + 24576 = 147456; m = 3: 4 slots.
    c = cluster(beta=1e30, inter_beta=1e30, matmul=1.0)
    r = pa.step(TINY, c, pa.Layout(2, 1, 1, 1), 16, 3)
    assert r["time"] == pytest.approx(4 * 147456)
    # model FLOPs per sequence: 6 * (4*640 + 256) * 16 + 4 layers * 3 * 4*D*H * 16*17/2 = 270336 + 52224
    assert r["mfu"] == pytest.approx(3 * (270336 + 52224) / (4 * 147456 * 2 * 1.0))
    assert r["tokens_per_s_gpu"] == pytest.approx(3 * 16 / (4 * 147456) / 2)


def test_memory_hand_case():
    # A_1 = 2 * (4*8 + 2*2*4 + 2*2*4 + 4*16) + 4*2 = 264 bytes per token and layer. 2 stages, m = 3, 16 tokens.
    # stage 0: (2*656 + 256 embedding) params * 18 bytes + 2 in flight * 2 layers * 16 * 264    = 28224 + 16896
    # stage 1: (2*656 + 256 head + 8 norm) * 18 + 1 * 2 * 16 * 264 + 16 * (2*8*2 + 6*32) logits = 28368 + 8448 + 3584
    assert TINY.activation_bytes_per_token(1) == 264
    expected = 28224 + 16896
    assert pa.step(TINY, cluster(memory=expected), pa.Layout(2, 1, 1, 1), 16, 3)["memory"] == pytest.approx(expected)
    assert pa.step(TINY, cluster(memory=expected), pa.Layout(2, 1, 1, 1), 16, 3)["fits"]
    assert not pa.step(TINY, cluster(memory=expected - 1), pa.Layout(2, 1, 1, 1), 16, 3)["fits"]


def real_cluster(alpha=True):
    hw = pa.default_cluster()[0].hw
    if not alpha:   # zero latencies and ring-step overhead: every term linear in the micro-batch size
        hw = dataclasses.replace(hw, intra=dataclasses.replace(hw.intra, alpha_s=0.0),
                                 inter=dataclasses.replace(hw.inter, alpha_s=0.0), overhead_s=0.0)
    return pa.Cluster(hw)


@pytest.mark.parametrize("pp", [1, 2, 4, 8])
def test_more_micro_batches_never_slow_the_step(pp):
    # fixed global batch split into more, smaller micro-batches: the bubble shrinks, nothing else grows
    c, layout = real_cluster(alpha=False), pa.Layout(pp, 2, 4, 2)
    times = [pa.step(LLAMA, c, layout, 131072, 64, micro_batch=b)["time"] for b in (32, 16, 8, 4, 2, 1)]
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(times, times[1:])), times
    if pp == 1:
        assert times[-1] == pytest.approx(times[0], rel=1e-9)
    else:
        assert times[-1] < 0.9 * times[0]


@pytest.mark.parametrize("pp", [1, 2, 8])
def test_bigger_global_batch_never_lowers_throughput(pp):
    c, layout = real_cluster(), pa.Layout(pp, 2, 4, 2)
    tput = [pa.step(LLAMA, c, layout, 131072, g)["tokens_per_s_gpu"] for g in (2, 4, 8, 16, 32, 64, 128)]
    assert all(later >= earlier * (1 - 1e-12) for earlier, later in zip(tput, tput[1:])), tput


def test_memory_falls_as_context_parallelism_grows():
    c = real_cluster()
    for pp, tp in itertools.product((1, 2, 4), (1, 2, 8)):
        mem = [pa.step(LLAMA, c, pa.Layout(pp, tp, cp, 64 // (pp * tp * cp)), 131072, 64)["memory"]
               for cp in (1, 2, 4) if 64 % (pp * tp * cp) == 0]
        assert all(later < earlier for earlier, later in zip(mem, mem[1:])), (pp, tp, mem)


def test_sweep_sorted_and_terms_add_up():
    rows = pa.sweep(LLAMA, real_cluster(), 64, 131072, 64)
    assert as_tuples(r["layout"] for r in rows) == brute_force_layouts(64, 32, 8, 131072, 64)
    fits = [r["fits"] for r in rows]
    assert any(fits) and not all(fits) and fits == sorted(fits, reverse=True)
    for group in ([r for r in rows if r["fits"]], [r for r in rows if not r["fits"]]):
        tput = [r["tokens_per_s_gpu"] for r in group]
        assert tput == sorted(tput, reverse=True)
    for r in rows:
        assert sum(r["terms"].values()) == pytest.approx(r["time"], rel=1e-9)
        assert r["m"] == 64 // r["layout"].dp and 0 < r["mfu"] < 1
    unsharded = next(r for r in rows if (r["layout"].pp, r["layout"].tp, r["layout"].cp) == (1, 1, 1))
    assert not unsharded["fits"]                         # 128K tokens of activations on one GPU


def test_cli_writes_both_files(tmp_path):
    md = pa.main(["--out", tmp_path])
    assert md == tmp_path / "parallelism_llama8b_128k.md"
    text = md.read_text()
    assert "MODELLED" in text and "ASSUMED" in text and "python -m benchmarks.parallelism --out" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert len(rows) == len(brute_force_layouts(64, 32, 8, 131072, 64))
    pytest.importorskip("matplotlib")
    assert (tmp_path / "parallelism_llama8b_128k.png").stat().st_size > 0


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        pa.main(["--out", tmp_path, "--gpus", "0"])
