"""launch/train.py: sequence x data parallel training over real gloo worlds.

One world of 2 and one of 4 ranks are spawned (launch/spawn.py), each running several ``train.main``
calls; the world of one runs in this process. Same seed, same global batch: the losses of sp=1, 2, 4
and of 2 DP replicas x sp=2 agree to float noise (the ring only reorders float sums); replicas end with
the same parameters; a resumed checkpoint continues the run exactly; bad configs exit with one line.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch import train
from launch.spawn import WorldFailed, run_world

ROOT = Path(__file__).resolve().parents[1]

STEPS = 5
COMMON = ["--log-every", "1000", "--device", "cpu"]  # quiet; CPU also where CUDA is present (gloo)
PARITY_RTOL = 1e-6  # float32; measured: about 1.2e-7 relative over the first 5 steps


def run_mains(rank, world_size, runs):
    """``train.main(argv)`` for every (name, argv) of ``runs`` in turn on this rank:
    {name: (losses, checksum)} or, for a run that exits, {name: ("exit", code, its stderr)}."""
    results = {}
    for name, argv in runs:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                results[name] = tuple(train.main(argv + COMMON))
        except SystemExit as exit:
            results[name] = ("exit", exit.code, stderr.getvalue())
    return results


@pytest.fixture(scope="module")
def single():
    """sp=1 in this process (no process group): 30 steps, one thread like every spawned rank."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main(["--steps", "30"] + COMMON)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("train") / "ckpt.pt")
    runs = [
        ("sp2", ["--sp", "2", "--steps", str(STEPS)]),
        ("sp2_striped", ["--sp", "2", "--steps", str(STEPS), "--layout", "striped"]),
        ("first_half", ["--sp", "2", "--steps", "3", "--save", ckpt]),
        ("resumed", ["--sp", "2", "--steps", str(STEPS), "--resume", ckpt]),
        ("sp4_in_world2", ["--sp", "4"]),
        ("sp2_ckpt_fused", ["--sp", "2", "--steps", str(STEPS), "--checkpoint-layers", "--fused-loss"]),
    ]
    return run_world(2, run_mains, runs, timeout=120)


@pytest.fixture(scope="module")
def world4():
    runs = [
        ("sp4", ["--sp", "4", "--steps", str(STEPS)]),
        ("dp2_sp2", ["--sp", "2", "--steps", str(STEPS)]),
    ]
    return run_world(4, run_mains, runs, timeout=120)


def assert_close(got, expected, rtol):
    assert len(got) == len(expected), (got, expected)
    worst = max(abs(g - e) / abs(e) for g, e in zip(got, expected))
    assert worst <= rtol, f"relative difference {worst:.2e} > {rtol}: {got} vs {expected}"


def test_the_task_is_learnable(single):
    losses = single.losses
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}: {losses}"


@pytest.mark.parametrize("world,run", [("world2", "sp2"), ("world2", "sp2_striped"), ("world4", "sp4"),
                                       ("world2", "sp2_ckpt_fused")])
def test_sequence_parallel_losses_match_one_process(single, world, run, request):
    ranks = request.getfixturevalue(world)
    expected = single.losses[:STEPS]
    for results in ranks:  # every rank reports the all-reduced loss
        losses, _ = results[run]
        assert_close(losses, expected, PARITY_RTOL)


def test_data_x_sequence_parallel_replicas_stay_identical(single, world4):
    runs = [results["dp2_sp2"] for results in world4]
    losses, checksums = [r[0] for r in runs], [r[1] for r in runs]
    assert all(math.isfinite(x) for x in losses[0]) and len(losses[0]) == STEPS
    assert all(x == losses[0] for x in losses), f"ranks report different losses: {losses}"
    assert all(c == checksums[0] for c in checksums), f"parameters differ across ranks: checksums {checksums}"
    # the same global batch (4 sequences) split over 2 replicas: the same losses as one process
    assert_close(losses[0], single.losses[:STEPS], PARITY_RTOL)


def test_checkpointed_layers_and_fused_loss_train_like_the_plain_model(world2):
    """--checkpoint-layers (dist_attn.checkpoint_layer) and --fused-loss (dist_attn.linear_cross_entropy): the same
    parameters after STEPS steps as the plain sp2 run (so the same gradients every step), to float32 rounding."""
    for results in world2:
        (plain_losses, plain_sum), (losses, checksum) = results["sp2"], results["sp2_ckpt_fused"]
        assert_close(losses, plain_losses, PARITY_RTOL)
        assert abs(checksum - plain_sum) <= 1e-6 * abs(plain_sum), (checksum, plain_sum)


def test_resume_continues_the_uninterrupted_run(world2):
    for rank, results in enumerate(world2):
        uninterrupted, first_half, resumed = results["sp2"][0], results["first_half"][0], results["resumed"][0]
        assert first_half == uninterrupted[:3], (rank, first_half, uninterrupted)
        assert len(resumed) == STEPS - 3
        assert_close(resumed, uninterrupted[3:], 1e-6)


def test_world_size_not_divisible_by_sp_exits_with_one_line_on_rank_0(world2):
    (tag0, code0, err0), (tag1, code1, err1) = (results["sp4_in_world2"] for results in world2)
    assert (tag0, code0, tag1, code1) == ("exit", 2, "exit", 2)
    assert "error: sp (4) must divide the world size (2)" in err0 and "Traceback" not in err0, err0
    assert err1 == "", f"rank 1 printed: {err1!r}"


@pytest.mark.parametrize("argv,message", [
    (["--sp", "4", "--seqlen", "100"], "seqlen (100) must be a multiple of 8 (2 * sp for layout 'zigzag', sp=4)"),
    (["--sp", "3", "--seqlen", "100", "--layout", "striped"], "seqlen (100) must be a multiple of 3 (sp, sp=3)"),
    (["--heads", "4", "--kv-heads", "3"], "heads (4) must be divisible by kv_heads (3)"),
    (["--dim", "60", "--heads", "4"], "dim (60) must be heads (4) x an even head size"),
    (["--layout", "ring"], "layout must be one of"),
    (["--pairs", "70"], "seqlen (256) must be even and >= 4 * pairs (280)"),
    (["--pairs", "40"], "vocab (32) must be >= 2 * pairs + 2 (82)"),
    (["--sp", "2"], "sp (2) must divide the world size (1)"),
    (["--batch", "3", "--steps", "0"], "steps must be >= 1"),
])
def test_bad_config_exits_with_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and f"error: {message}" in err, err
    assert "Traceback" not in err


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match=r"^sp \(2\) must divide the world size \(3\)"):
        train.TrainConfig(sp=2).check_world(3)
    with pytest.raises(ValueError, match=r"^batch \(4\) must be a multiple of the data-parallel size"):
        train.TrainConfig(sp=1, batch=4).check_world(3)
    with pytest.raises(ValueError, match=r"^save_every needs save"):
        train.TrainConfig(save_every=5)


def test_sequences_are_associative_recall():
    cfg = train.TrainConfig(seqlen=64, pairs=8, vocab=32)
    ids, labels = train.make_sequence(cfg, step=1, index=0)
    pairs = ids.view(-1, 2)  # (slots, 2): key, value
    context = dict(pairs[:cfg.pairs].tolist())
    assert len(context) == cfg.pairs and all(1 <= k < 16 <= v < 32 for k, v in context.items())
    answers = (labels != train.IGNORE).nonzero().flatten()
    assert len(answers) == cfg.pairs and (answers % 2 == 0).all() and (answers >= 2 * cfg.pairs).all()
    assert sorted(ids[answers].tolist()) == sorted(context)  # every context key is asked once...
    assert all(labels[i].item() == context[ids[i].item()] == ids[i + 1].item() for i in answers)  # ...for its value
    other = torch.ones_like(ids, dtype=torch.bool)
    other[:2 * cfg.pairs] = False
    other[answers], other[answers + 1] = False, False
    assert (ids[other] == train.FILLER).all()
    assert torch.equal(ids, train.make_sequence(cfg, step=1, index=0)[0])
    assert not torch.equal(ids, train.make_sequence(cfg, step=1, index=1)[0])


# ---------------------------------------------------------------------------------------------- faults

def train_main(rank, world_size, argv):
    return tuple(train.main(argv + COMMON))


def test_a_rank_failing_mid_ring_fails_the_world(monkeypatch):
    monkeypatch.setenv("DIST_ATTN_FAIL_RANK", "1")  # inherited by the spawned ranks
    start = time.monotonic()
    with pytest.raises(WorldFailed) as failure:
        run_world(2, train_main, ["--sp", "2", "--steps", "2"], timeout=120, pg_timeout_s=20)
    assert failure.value.summary == ("world of 2: rank 1 failed: RuntimeError: injected fault: kernel call 2 of the "
                                     "ring forward on rank 1; then rank 0 failed waiting for it"), failure.value
    assert "RingTimeoutError: ring_attention: rank 0: " in failure.value.failures[0]
    assert time.monotonic() - start < 20 + 60


def test_a_rank_failing_mid_ring_under_torchrun_exits_with_one_line_per_rank():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    env.update(PYTHONPATH=str(ROOT), DIST_ATTN_FAIL_RANK="1")
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29534", "-m", "launch.train", "--sp", "2", "--steps", "2", *COMMON],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0, run.stdout + run.stderr
    ours = [line[line.index("launch.train: error"):] for line in run.stderr.splitlines()
            if "launch.train: error" in line]
    root = ("launch.train: error: rank 1 failed: RuntimeError: injected fault: kernel call 2 of the ring forward "
            "on rank 1")
    assert root in ours, run.stderr
    # rank 0 fails at once (its connection to rank 1 closes) but torchrun may SIGTERM it before it prints
    assert all(line.startswith("launch.train: error: rank 0 stopped, as a peer failed: RingTimeoutError: "
                               "ring_attention: rank 0: ") for line in ours if line != root), run.stderr
    assert len(ours) <= 2 and "inject_ring_fault" not in run.stderr, run.stderr  # no traceback of ours
    assert time.monotonic() - start < train.PROCESS_GROUP_TIMEOUT.total_seconds()
