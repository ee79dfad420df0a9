"""DeepSpeed integration over a real gloo world of 4 ranks (spawned once, see launch/spawn.py).

- DeepSpeed's own ``DistributedAttention`` (Ulysses all-to-all) around our ``RingAttention``: for
  Ulysses x ring = 2 x 2, 1 x 4 and 4 x 1, causal and not, MHA and GQA, both batch layouts DeepSpeed
  passes (batch_dim_idx 0 and 1) and three sequence layouts, the gathered output and dq/dk/dv equal
  ``attention_reference`` in float64 on the full sequence (fp32: 2e-5 forward, 1e-4 gradients).
- ``launch.train_deepspeed`` under ZeRO stage 1 and 2 (``deepspeed.initialize`` with our ``mpu``) gives
  the losses of a one-process ``launch.train`` run with the same seed, and every rank ends with the
  same parameters; a DeepSpeed checkpoint resumes the run exactly.

DeepSpeed is used on CPU as it comes: ``deepspeed.init_distributed`` wraps the gloo group run_world
made; the worker sets LOCAL_RANK, which the engine requires. The first run JIT-builds DeepSpeed's CPU
shared-memory comm op (about 35 s on 2 cores, cached in ~/.cache/torch_extensions afterwards).
"""

from __future__ import annotations

import contextlib
import io
import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("deepspeed")

from attention_checks import max_error, reference_with_grads, value_errors  # noqa: E402
from launch.spawn import run_world  # noqa: E402
from train_checks import assert_close, one_process_run  # noqa: E402

FWD_TOL, GRAD_TOL = 2e-5, 1e-4  # fp32 vs float64 (docs/design.md)
PARITY_RTOL = 1e-5
STEPS = 5
WORLD = 4
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mha8": (8, 8), "gqa8": (8, 4)}
COMMON = ["--steps", str(STEPS), "--log-every", "1000", "--device", "cpu"]


def attention_cases():
    cases = []
    for causal in (False, True):
        for heads in ("mha", "gqa"):
            for batch_dim_idx in (0, 1):
                cases.append(dict(u=2, r=2, causal=causal, heads=heads, layout="zigzag", batch_dim_idx=batch_dim_idx,
                                  wrapper="ds"))
    for layout in ("contiguous", "striped"):
        cases.append(dict(u=2, r=2, causal=True, heads="gqa", layout=layout, batch_dim_idx=0, wrapper="ds"))
    cases += [
        dict(u=1, r=4, causal=True, heads="gqa", layout="zigzag", batch_dim_idx=0, wrapper="ds"),  # a Ulysses group of 1
        dict(u=4, r=1, causal=True, heads="gqa8", layout="zigzag", batch_dim_idx=1, wrapper="ds"),  # a ring of 1
        dict(u=4, r=1, causal=False, heads="mha", layout="zigzag", batch_dim_idx=0, wrapper="ds"),
        dict(u=2, r=2, causal=True, heads="gqa", layout="zigzag", batch_dim_idx=0, wrapper="module"),
        dict(u=2, r=2, causal=True, heads="gqa", layout="zigzag", batch_dim_idx=1, wrapper="module"),
        dict(u=1, r=4, causal=True, heads="mha", layout="zigzag", batch_dim_idx=0, wrapper="module"),
    ]
    return cases


def case_id(case):
    return "-".join(f"{k}{v}" for k, v in case.items())


def run_attention_case(rank, groups, case):
    """Ulysses x ring forward + backward through DeepSpeed's DistributedAttention; rank 0 returns the errors
    of the gathered output and gradients against float64 attention on the full sequence."""
    from deepspeed.sequence.layer import DistributedAttention

    from dist_attn import usp_gather, usp_shard
    from dist_attn.integrations.deepspeed import RingAttention, UlyssesRingAttention

    u, r, layout, bdim = case["u"], case["r"], case["layout"], case["batch_dim_idx"]
    nheads, nheads_kv = HEADS[case["heads"]]
    seqlen = 2 * r * u * 5 if layout == "zigzag" else r * u * 7  # odd pieces per rank
    gen = torch.Generator().manual_seed(seqlen * 100 + nheads_kv)
    q = torch.randn(2, seqlen, nheads, 16, generator=gen)
    k, v = (torch.randn(2, seqlen, nheads_kv, 16, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)

    def local(x):  # this rank's tokens, in the layout DeepSpeed is told about
        part = usp_shard(x, layout, groups.ulysses_rank, u, groups.ring_rank, r)
        return part.transpose(0, 1).contiguous() if bdim == 1 else part

    def full(x):  # back to (B, T_local, H, D), then the whole sequence
        return usp_gather(x.transpose(0, 1) if bdim == 1 else x, layout, groups.ulysses_group, groups.ring_group)

    leaves = [local(x).requires_grad_() for x in (q, k, v)]
    if case["wrapper"] == "ds":
        attn = DistributedAttention(RingAttention(groups.ring_group, causal=case["causal"], layout=layout,
                                                  batch_dim_idx=bdim), groups.ulysses_group)
        out = attn(*leaves, bdim)
    else:
        attn = UlyssesRingAttention(groups.ulysses_group, groups.ring_group, causal=case["causal"], layout=layout,
                                    batch_dim_idx=bdim)
        out = attn(*leaves)
    out.backward(local(dout))
    results = [full(t.detach()) for t in (out, *(x.grad for x in leaves))]
    if rank != 0:
        return None
    ref_out, _, *ref_grads = reference_with_grads(q, k, v, dout, case["causal"])
    errors = {name: max_error(got, ref) for name, got, ref in zip(("out", "dq", "dk", "dv"), results,
                                                                    (ref_out, *ref_grads))}
    errors["nan"] = any(torch.isnan(t).any().item() for t in results)
    return errors


def run_misuse(groups):
    """Errors the adapter raises instead of computing something wrong (no collective is reached)."""
    from dist_attn.integrations.deepspeed import RingAttention, UlyssesRingAttention

    x = torch.randn(1, 8, 2, 8)
    ring = RingAttention(groups.ring_group, causal=True)
    mqa = torch.randn(1, 8, 1, 8)
    return value_errors({
        "mask": lambda: ring(x, x, x, torch.ones(8, 8)),
        "mask_kwarg": lambda: ring(x, x, x, attention_mask=torch.ones(8, 8)),
        "kv_heads": lambda: UlyssesRingAttention(groups.ulysses_group, groups.ring_group)(x, mqa, mqa),
        "batch_dim_idx": lambda: RingAttention(batch_dim_idx=2),
        "layout": lambda: RingAttention(layout="diagonal"),
        "none_args_ok": lambda: RingAttention(groups.ring_group)(
            torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), None, attention_mask=None),
    })


def run_shard_batch(groups):
    """shard_batch against usp_shard; the positions of all ranks of the sequence group, gathered."""
    from dist_attn import usp_shard
    from dist_attn.integrations.deepspeed import shard_batch

    ids = torch.arange(2 * 24).reshape(2, 24)
    batch = {"input_ids": ids, "labels": ids + 1000, "meta": "kept"}
    out = shard_batch(batch, groups, "zigzag")
    coords = (groups.ulysses_rank, groups.ulysses_size, groups.ring_rank, groups.ring_size)
    positions = [torch.empty_like(out["position_ids"]) for _ in range(groups.sp_size)]
    dist.all_gather(positions, out["position_ids"], group=groups.sp_group)
    with_positions = shard_batch({"input_ids": ids, "position_ids": torch.arange(24).expand(2, 24)}, groups)
    return {
        "ids": torch.equal(out["input_ids"], usp_shard(ids, "zigzag", *coords)),
        "labels": torch.equal(out["labels"], usp_shard(ids + 1000, "zigzag", *coords)),
        "positions_are_ids": torch.equal(out["position_ids"], out["input_ids"][0]),  # ids[0] = arange(T)
        "given_positions": torch.equal(with_positions["position_ids"][1], out["position_ids"]),
        "meta": out["meta"],
        "all_positions": sorted(torch.cat(positions).tolist()),
    }


def run_train(rank, runs):
    """``launch.train_deepspeed.main(COMMON + argv)`` for every (name, argv): {name: (losses, checksum)} or
    ("exit", code, stderr) for a run that exits."""
    from launch import train_deepspeed

    results = {}
    for name, argv in runs:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                results[name] = tuple(train_deepspeed.main(COMMON + argv))  # argv's options win
        except SystemExit as exit:
            results[name] = ("exit", exit.code, stderr.getvalue()[-2000:])
    return results


def run_everything(rank, world_size, cases, runs):
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine requires it; one node
    import deepspeed

    from dist_attn.groups import sequence_parallel_groups

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group run_world created
    meshes = {(u, r): sequence_parallel_groups(u, r) for u, r in sorted({(c["u"], c["r"]) for c in cases})}
    total = torch.tensor([float(rank)])
    deepspeed.comm.all_reduce(total, group=meshes[2, 2].ring_group)  # deepspeed.comm over our gloo groups
    return {
        "comm": (deepspeed.comm.get_world_size(), deepspeed.comm.get_rank(), total.item()),
        "attention": {case_id(c): run_attention_case(rank, meshes[c["u"], c["r"]], c) for c in cases},
        "misuse": run_misuse(meshes[2, 2]),
        "shard_batch": {key: run_shard_batch(mesh) for key, mesh in meshes.items()},
        "train": run_train(rank, runs),
    }


def train_runs(ckpt_dir):
    zero1, zero2 = "launch/ds_zero1.json", "launch/ds_zero2.json"
    return [
        ("zero2_u2_r2", ["--deepspeed", zero2, "--ulysses", "2", "--ring", "2"]),
        ("zero1_u2_dp2", ["--deepspeed", zero1, "--ulysses", "2"]),
        ("zero2_r2_dp2_striped", ["--deepspeed", zero2, "--ring", "2", "--layout", "striped"]),
        ("zero1_r4_ckpt_fused", ["--deepspeed", zero1, "--ring", "4", "--checkpoint-layers", "--fused-loss"]),
        ("first_part", ["--deepspeed", zero2, "--ulysses", "2", "--ring", "2", "--save", ckpt_dir, "--steps", "3"]),
        ("resumed", ["--deepspeed", zero2, "--ulysses", "2", "--ring", "2", "--resume", ckpt_dir]),
        ("bad_ulysses", ["--deepspeed", zero2, "--ulysses", "4"]),  # kv_heads 2 is not a multiple of 4
        ("bad_batch", ["--deepspeed", zero2, "--ulysses", "2", "--batch", "3"]),  # dp 2 does not divide 3
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ds") / "ckpt")
    runs = train_runs(ckpt)
    return run_world(WORLD, run_everything, attention_cases(), runs, timeout=600, pg_timeout_s=60)


@pytest.fixture(scope="module")
def single():
    return one_process_run(["--steps", str(STEPS), "--log-every", "1000", "--device", "cpu"])


CASES = attention_cases()


def test_deepspeed_comm_wraps_the_existing_gloo_group(world):
    for rank, result in enumerate(world):
        ring_peers = [rank % 2, rank % 2 + 2]  # u=2 x r=2: ring groups [0 2] and [1 3]
        assert result["comm"] == (WORLD, rank, float(sum(ring_peers))), result["comm"]


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_distributed_attention_around_ring_matches_full_attention(world, case):
    errors = world[0]["attention"][case_id(case)]
    assert not errors["nan"], errors
    assert errors["out"] <= FWD_TOL, errors
    assert max(errors["dq"], errors["dk"], errors["dv"]) <= GRAD_TOL, errors


def test_misuse_raises(world):
    for rank, result in enumerate(world):
        misuse = result["misuse"]
        assert "attention mask" in misuse["mask"] and "attention mask" in misuse["mask_kwarg"], misuse
        assert "nheads_kv (1)" in misuse["kv_heads"] and "Ulysses degree (2)" in misuse["kv_heads"], misuse
        assert "batch_dim_idx" in misuse["batch_dim_idx"] and "layout" in misuse["layout"], misuse
        assert misuse["none_args_ok"] is None, misuse


def test_shard_batch_follows_usp_shard(world):
    for rank, result in enumerate(world):
        for mesh, checks in result["shard_batch"].items():
            assert checks["ids"] and checks["labels"] and checks["meta"] == "kept", (rank, mesh, checks)
            assert checks["positions_are_ids"] and checks["given_positions"], (rank, mesh, checks)
            assert checks["all_positions"] == list(range(24)), (rank, mesh, checks["all_positions"])


@pytest.mark.parametrize("name", ["zero2_u2_r2", "zero1_u2_dp2", "zero2_r2_dp2_striped", "zero1_r4_ckpt_fused"])
def test_zero_training_matches_one_process(world, single, name):
    """Same losses and parameters; the same gradient norms too, which checks the scale of DeepSpeed's
    reduction (summed over SP, averaged over replicas) that Adam and clipping would otherwise hide."""
    results = [rank_result["train"][name] for rank_result in world]
    assert results[0][0] != "exit", results[0]
    losses, checksum, grad_norms = results[0]
    assert_close(losses, single.losses, PARITY_RTOL)
    assert_close(grad_norms, single.grad_norms, PARITY_RTOL)
    for rank, (rank_losses, rank_checksum, rank_norms) in enumerate(results):
        assert rank_losses == losses and rank_norms == grad_norms, (rank, rank_losses, rank_norms)
        assert rank_checksum == checksum, (rank, rank_checksum, checksum)  # replicas hold the same parameters
    assert abs(checksum - single.checksum) <= 1e-5 * abs(single.checksum), (checksum, single.checksum)


def test_deepspeed_checkpoint_resumes_exactly(world):
    train_results = world[0]["train"]
    first, resumed, full = train_results["first_part"], train_results["resumed"], train_results["zero2_u2_r2"]
    assert first[0] == full[0][:3], (first, full)
    assert resumed[0] == full[0][3:], (resumed, full)
    assert resumed[1] == full[1]


def test_bad_configs_exit_with_one_line(world):
    for name, words in (("bad_ulysses", ["kv_heads (2)", "ulysses (4)"]), ("bad_batch", ["batch (3)"])):
        outcome = world[0]["train"][name]
        assert outcome[:2] == ("exit", 2), outcome
        assert all(word in outcome[2] for word in words), outcome
        assert all(rank_result["train"][name][2] == "" for rank_result in world[1:])  # only rank 0 prints
