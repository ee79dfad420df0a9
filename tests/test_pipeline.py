"""DeepSpeed pipeline parallelism x sequence (ring, Ulysses) x data x tensor parallelism, on gloo.

One world of 4 ranks (spawned once) trains ``launch.train_pipeline`` in every configuration below; each must
give the losses **and gradient norms** of a one-process ``launch.train`` run on the same data and weights
(relative 1e-5), with every rank agreeing and every replica holding the same parameters. A checkpoint taken
after 2 steps resumes bit for bit; the layer files are written once per layer (by sequence rank 0), not once
per sequence rank. bf16 trains end to end with losses within bf16 tolerance of fp32. The bytes one rank sends
to the next stage per micro-batch equal ``benchmarks.parallelism.stage_boundary_bytes``. The settings that
would be silently wrong or hang are refused up front (in this process: no world needed). Worlds of 8 ranks
(pp2 x ring2 x dp2, pp2 x tp2 x ring2, pp2 x Ulysses2 x ring2) are marked ``slow``.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from launch import train  # noqa: E402
from attention_checks import value_errors  # noqa: E402
from launch.spawn import run_world  # noqa: E402
from train_checks import assert_close, one_process_run  # noqa: E402

STEPS = 4
PARITY_RTOL = 1e-5
BF16_RTOL = 2e-2  # loss of bf16 weights/activations vs fp32, per step
COMMON = ["--steps", str(STEPS), "--log-every", "1000", "--device", "cpu"]
RUNS_4 = {
    "pp2_r2": ["--pipeline", "2", "--ring", "2"],
    "pp2_u2": ["--pipeline", "2", "--ulysses", "2"],
    "pp2_dp2": ["--pipeline", "2"],
    "pp4_m4": ["--pipeline", "4", "--micro-batches", "4"],
    "pp2_tp2": ["--pipeline", "2", "--tensor", "2"],
    "pp2_r2_m2_ckpt": ["--pipeline", "2", "--ring", "2", "--micro-batches", "2", "--checkpoint-layers",
                       "--fused-loss", "--layout", "striped"],
    "pp2_r2_bf16": ["--pipeline", "2", "--ring", "2", "--dtype", "bf16"],
}
RUNS_8 = {
    "pp2_r2_dp2": ["--pipeline", "2", "--ring", "2"],
    "pp2_tp2_r2": ["--pipeline", "2", "--tensor", "2", "--ring", "2"],
    "pp2_u2_r2": ["--pipeline", "2", "--ulysses", "2", "--ring", "2", "--micro-batches", "2"],
}


def count_stage_sends():
    """Records the bytes of every tensor the pipeline engine sends to a neighbour stage, one list per
    ``train_batch`` call (test instrumentation of DeepSpeed's p2p module)."""
    from deepspeed.runtime.pipe import engine, p2p

    per_step, send, train_batch = [], p2p.send, engine.PipelineEngine.train_batch

    def counting_send(tensor, *args, **kwargs):
        if per_step:
            per_step[-1].append(tensor.numel() * tensor.element_size())
        return send(tensor, *args, **kwargs)

    def marking_train_batch(self, *args, **kwargs):
        per_step.append([])
        return train_batch(self, *args, **kwargs)

    p2p.send, engine.PipelineEngine.train_batch = counting_send, marking_train_batch
    return per_step


def tensor_parallel_checks(world_size):
    """Column- then row-parallel MLP over all ranks against the unsplit one (forward, input and weight
    gradients: max abs errors), and the errors from_linear raises."""
    import torch.distributed as dist
    import torch.nn as nn

    from dist_attn.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    group = dist.new_group(list(range(world_size)))
    rank = dist.get_rank(group)
    gen = torch.Generator().manual_seed(0)
    up, down = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        up.weight.copy_(torch.randn(16, 8, generator=gen))
        down.weight.copy_(torch.randn(8, 16, generator=gen))
    x = torch.randn(3, 8, generator=gen, requires_grad=True)
    dout = torch.randn(3, 8, generator=gen)
    column, row = ColumnParallelLinear.from_linear(up, group), RowParallelLinear.from_linear(down, group)
    x_tp = x.detach().clone().requires_grad_()
    (down(torch.nn.functional.gelu(up(x))) * dout).sum().backward()
    out_tp = row(torch.nn.functional.gelu(column(x_tp)))
    (out_tp * dout).sum().backward()
    rows = slice(rank * 16 // world_size, (rank + 1) * 16 // world_size)
    errors = {"out": (out_tp - down(torch.nn.functional.gelu(up(x)))).abs().max().item(),
              "dx": (x_tp.grad - x.grad).abs().max().item(),
              "dup": (column.weight.grad - up.weight.grad[rows]).abs().max().item(),
              "ddown": (row.weight.grad - down.weight.grad[:, rows]).abs().max().item(),
              "marked": [column.weight.tensor_model_parallel, column.weight.partition_dim, row.weight.partition_dim]}
    return errors | value_errors({
        "bias": lambda: ColumnParallelLinear.from_linear(nn.Linear(8, 8), group),
        "row_bias": lambda: RowParallelLinear.from_linear(nn.Linear(8, 8), group),
        "split": lambda: ColumnParallelLinear.from_linear(nn.Linear(8, 6, bias=False), group),
        "parts": lambda: ColumnParallelLinear.from_linear(nn.Linear(8, 12, bias=False), group, 2)})


def run_training(rank, world_size, runs, ckpt_dir):
    os.environ["LOCAL_RANK"] = str(rank)  # DeepSpeed's engine requires it; one node
    import deepspeed

    from launch import train_pipeline

    deepspeed.init_distributed(dist_backend="gloo")  # wraps the group run_world created
    sends = count_stage_sends()
    results = {"tensor_parallel": tensor_parallel_checks(world_size)}
    for name, argv in runs.items():
        sends.clear()
        with contextlib.redirect_stderr(io.StringIO()):
            results[name] = tuple(train_pipeline.main(COMMON + argv))
        results[name] += (sends[-1],)
    if ckpt_dir is not None:  # save after 2 steps, resume to STEPS
        base = COMMON + RUNS_4["pp2_r2"]
        with contextlib.redirect_stderr(io.StringIO()):
            results["first_part"] = tuple(train_pipeline.main(base + ["--steps", "2", "--save", ckpt_dir]))
            results["resumed"] = tuple(train_pipeline.main(base + ["--resume", ckpt_dir]))
    return results


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("pipeline") / "ckpt")


@pytest.fixture(scope="module")
def world4(ckpt_dir):
    return run_world(4, run_training, RUNS_4, ckpt_dir, timeout=900, pg_timeout_s=60)


@pytest.fixture(scope="module")
def single():
    return one_process_run(COMMON)


def check_parity(world, single, name, rtol=PARITY_RTOL):
    results = [rank_result[name] for rank_result in world]
    losses, checksum, grad_norms, _ = results[0]
    assert_close(losses, single.losses, rtol)
    assert_close(grad_norms, single.grad_norms, rtol)
    assert abs(checksum - single.checksum) <= rtol * abs(single.checksum), (checksum, single.checksum)
    for rank, (rank_losses, rank_checksum, rank_norms, _) in enumerate(results):
        assert rank_losses == losses and rank_norms == grad_norms, (rank, rank_losses, rank_norms)
        assert abs(rank_checksum - checksum) <= 1e-12 * abs(checksum), (rank, rank_checksum, checksum)


@pytest.mark.parametrize("name", [n for n in RUNS_4 if "bf16" not in n])
def test_pipeline_training_matches_one_process(world4, single, name):
    """Same losses, gradient norms and parameters as one process: the norm checks the scale of the reduction
    (summed over sequence ranks, averaged over replicas, counted once per stage and tensor shard) that Adam
    would hide."""
    check_parity(world4, single, name)


def test_bf16_trains_close_to_fp32(world4, single):
    losses, _, grad_norms, _ = world4[0]["pp2_r2_bf16"]
    assert all(torch.isfinite(torch.tensor(losses + grad_norms))), (losses, grad_norms)
    assert_close(losses, single.losses, BF16_RTOL)


def test_checkpoint_resumes_exactly_with_one_file_per_layer(world4, ckpt_dir):
    full, first, resumed = (world4[0][name] for name in ("pp2_r2", "first_part", "resumed"))
    assert first[0] == full[0][:2], (first, full)
    assert resumed[0] == full[0][2:], (resumed, full)
    assert resumed[1] == full[1] and resumed[2] == full[2][2:]
    layer_files = sorted(p.name for p in Path(ckpt_dir, "step2").glob("layer_*"))
    assert layer_files == [f"layer_{i:02d}-model_states.pt" for i in range(4)], layer_files  # not one per sp rank


def test_stage_boundary_bytes_match_the_cost_model(world4):
    from benchmarks.parallelism import stage_boundary_bytes

    cfg = train.TrainConfig()
    expected = stage_boundary_bytes(micro_batch=cfg.batch, tokens_per_rank=cfg.seqlen // 2, dim=cfg.dim,
                                    dtype_bytes=4)
    stage0, stage1 = world4[0]["pp2_r2"][3], world4[2]["pp2_r2"][3]  # ranks 0, 2: ring rank 0 of stages 0, 1
    assert stage0 == [expected["forward"] - cfg.seqlen // 2 * 8, cfg.seqlen // 2 * 8], stage0  # hidden, positions
    assert sum(stage1) == expected["backward"], stage1
    m4 = world4[0]["pp4_m4"][3]  # 4 micro-batches of 1 sequence, all tokens (sp 1)
    per_micro = stage_boundary_bytes(micro_batch=1, tokens_per_rank=cfg.seqlen, dim=cfg.dim, dtype_bytes=4)
    assert sum(m4) == 4 * per_micro["forward"], m4


def test_tensor_parallel_layers_equal_the_unsplit_ones(world4):
    for rank, result in enumerate(world4):
        checks = result["tensor_parallel"]
        assert max(checks[name] for name in ("out", "dx", "dup", "ddown")) <= 1e-5, (rank, checks)
        assert checks["marked"] == [True, 0, 1], checks  # what DeepSpeed's gradient norm reads
        assert "has a bias" in checks["bias"] and "has a bias" in checks["row_bias"], checks
        assert "6 output features in 1 part(s) do not split over 4 tensor ranks" in checks["split"], checks
        assert "12 output features in 2 part(s)" in checks["parts"], checks


@pytest.mark.slow
def test_eight_rank_worlds(single):
    world = run_world(8, run_training, RUNS_8, None, timeout=900, pg_timeout_s=60)
    for name in RUNS_8:
        check_parity(world, single, name)


# ------------------------------------------------------------------------- refusals (no world needed)

def groups_stub(sp_size=2, pipe=2):
    """A SequenceParallelGroups with no process groups: the module's checks run before it touches them."""
    from dist_attn.groups import Coordinates, SequenceParallelGroups

    names = ("ulysses_group", "ring_group", "sp_group", "dp_group", "sp_dp_group", "pipe_group", "tensor_group",
             "model_parallel_group")
    return SequenceParallelGroups(**dict.fromkeys(names), coords=Coordinates(0, 0, 0, 0, 0),
                                  degrees=Coordinates(pipe, 1, sp_size, 1, 1))


ZERO1 = {"zero_optimization": {"stage": 1}}


def refusal(**changes):
    from deepspeed.pipe import TiedLayerSpec

    from dist_attn.integrations.deepspeed_pipeline import SequenceParallelPipelineModule

    args = dict(layers=[torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)], groups=groups_stub(), config=ZERO1)
    args |= changes
    layers = args.pop("layers")
    if layers == "tied":
        layers = [TiedLayerSpec("embed", torch.nn.Embedding, 8, 4), torch.nn.Linear(4, 4)]
    with pytest.raises(ValueError) as error:
        SequenceParallelPipelineModule(layers, **args)
    return str(error.value)


@pytest.mark.parametrize("changes,words", [
    (dict(layers="tied"), ["layers [0]", "TiedLayerSpec", "hang"]),
    (dict(config={"zero_optimization": {"stage": 0}}), ["zero_optimization.stage is 0", "sp = 2", "stage 1"]),
    (dict(config={}), ["zero_optimization.stage is 0"]),
    (dict(config={"zero_optimization": {"stage": 2}}), ["zero_optimization.stage is 2", "stage 0 or 1"]),
    (dict(config={"zero_optimization": {"stage": 3}}, groups=groups_stub(sp_size=1)), ["stage is 3"]),
    (dict(config=ZERO1 | {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}),
     ["data_types.grad_accum_dtype", "BF16_Optimizer"]),
    (dict(config=ZERO1 | {"bfloat16": {"enabled": True}, "data_types": {"grad_accum_dtype": "float32"}}),
     ["data_types.grad_accum_dtype", "BF16_Optimizer"]),
    (dict(config="/nonexistent/ds.json"), ["config", "/nonexistent/ds.json"]),
    (dict(config=3), ["config must be a DeepSpeed config dict"]),
    (dict(num_stages=2), ["num_stages", "from groups"]),
    (dict(topology="pipe"), ["topology", "from groups"]),
    (dict(groups="world"), ["groups must be a dist_attn.groups.SequenceParallelGroups", "str"]),
], ids=["tied", "zero0", "zero_default", "zero2", "zero3", "bf16_optimizer", "bfloat16_optimizer", "missing_file", "config_type",
        "num_stages", "topology", "groups"])
def test_silently_wrong_settings_are_refused(changes, words):
    message = refusal(**changes)
    for word in words:
        assert word in message, (word, message)


def test_allowed_settings_pass_the_check():
    from dist_attn.integrations.deepspeed_pipeline import check_pipeline_config

    assert check_pipeline_config(ZERO1, groups_stub()) == ZERO1
    no_sp = SimpleNamespace(sp_size=1)  # without sequence parallelism, ZeRO 0 reduces over the right ranks
    assert check_pipeline_config({"zero_optimization": {"stage": 0}}, no_sp)
    bf16 = ZERO1 | {"bf16": {"enabled": True}}  # bf16 with ZeRO-1's own fp32 master weights
    assert check_pipeline_config(bf16, groups_stub()) == bf16


@pytest.mark.parametrize("argv,words", [
    (["--tensor", "3"], ["heads (4)", "multiples of tensor (3)"]),
    (["--tensor", "2", "--ulysses", "2"], ["kv_heads / tensor (1)", "multiples of ulysses (2)"]),
    (["--pipeline", "3"], ["= 3) must divide the world size (4)"]),
    (["--pipeline", "2", "--micro-batches", "3"], ["batch (4)", "data parallel x micro_batches (2 x 3)"]),
    (["--dtype", "fp16"], ["dtype must be one of ['bf16', 'fp32']"]),
    (["--micro-batches", "0"], ["micro_batches must be an int >= 1; got 0"]),
], ids=["tensor", "tensor_ulysses", "pipeline", "micro_batches", "dtype", "zero_micro_batches"])
def test_bad_command_lines_exit_before_any_group(argv, words):
    """launch.train_pipeline's configuration errors: exit code 2 and one line naming the option, decided from
    the world size alone (no process group exists yet)."""
    from launch import train_pipeline
    from launch.train_deepspeed import parse_config

    stderr = io.StringIO()
    with pytest.raises(SystemExit) as exit, contextlib.redirect_stderr(stderr):
        parse_config(COMMON + argv, 0, 4, train_pipeline.PipelineTrainConfig, "launch.train_pipeline")
    assert exit.value.code == 2
    for word in words:
        assert word in stderr.getvalue(), (word, stderr.getvalue())
