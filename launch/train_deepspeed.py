"""``launch.train``'s model and task under DeepSpeed ZeRO with hybrid Ulysses x ring sequence parallelism.

The world of ``ulysses x ring x dp`` ranks is split by ``dist_attn.groups.sequence_parallel_groups``
(Ulysses on adjacent ranks, then ring, then data parallel); every attention layer is DeepSpeed-Ulysses'
``DistributedAttention`` over the Ulysses group around ``dist_attn`` ring attention over the ring group
(``dist_attn.integrations.deepspeed.UlyssesRingAttention``); ``deepspeed.initialize`` wraps the model
with ZeRO stage 1 or 2 (``launch/ds_zero1.json``, ``launch/ds_zero2.json``: fp32, torch AdamW passed
in, no fused optimizer to compile), its ``mpu`` (``groups.mpu``) making ZeRO partition and reduce over
all ranks and average over the dp replicas.

    torchrun --nproc_per_node 4 -m launch.train_deepspeed --deepspeed launch/ds_zero2.json --ulysses 2 --ring 2
    deepspeed --num_gpus 4 --module launch.train_deepspeed --deepspeed launch/ds_zero1.json --ulysses 2 --ring 2
    torchrun --nproc_per_node 8 -m launch.train_deepspeed --deepspeed launch/ds_zero2.json --ulysses 2 --ring 2 \\
        --batch 8                                           # 2 replicas x (2 x 2) sequence-parallel ranks
    python -m launch.train_deepspeed --steps 30            # one process (a world of one)
    python -m launch.train_deepspeed --help

On CPU (``--device cpu`` or no CUDA) the ranks use gloo; DeepSpeed's CPU accelerator JIT-builds a small
shared-memory op on first use (cached under ~/.cache/torch_extensions).

Data, loss and learning rate are ``launch.train``'s: sequence i of step s depends only on (seed, s, i),
replica d takes sequences ``[d * batch / dp, (d + 1) * batch / dp)``, and every rank's loss is the
cross-entropy summed over its tokens divided by the answer tokens of its replica's batch, so the SP
ranks' losses add up to the replica's mean loss. DeepSpeed sums gradients over all ranks and divides the
sum by dp (``dist_attn.groups.DeepSpeedMPU``): the same update as ``launch.train``, and
the same losses as a one-process ``python -m launch.train`` run with the same seed. Tokens are placed
on the ranks by ``dist_attn.integrations.deepspeed.shard_batch`` (``usp_shard``), RoPE uses their
global positions (``usp_positions``).

Batch size and gradient clipping come from the command line (``--batch``, ``--grad-clip``) and are
written into the DeepSpeed config (``train_batch_size``, ``train_micro_batch_size_per_gpu`` = batch / dp,
``gradient_accumulation_steps`` = 1, ``gradient_clipping``); a config file that sets them differently is
an error. ``--save DIR`` / ``--resume DIR`` use DeepSpeed checkpoints (``engine.save_checkpoint``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from dist_attn import checkpoint_layer
from launch.model import Transformer
from launch.train import IGNORE, TrainConfig, field_docs, init_distributed, launch_world, learning_rate, \
    loss_share, make_sequence, pick_device

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = str(REPO / "launch" / "ds_zero2.json")
EXCLUDED = ("sp",)  # derived: sp = ulysses * ring


@dataclasses.dataclass
class DeepSpeedTrainConfig(TrainConfig):
    ulysses: int = 1
    """Ulysses degree: adjacent ranks that exchange heads for sequence (divides heads and kv_heads)."""
    ring: int = 1
    """Ring degree: Ulysses groups whose K/V blocks travel around a ring; sp = ulysses x ring ranks share a sequence."""
    deepspeed: str = DEFAULT_DS_CONFIG
    """DeepSpeed config (JSON): ZeRO stage and the like; batch size and clipping come from this command line."""

    def __post_init__(self):
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        self.sp = self.ulysses * self.ring
        super().__post_init__()
        if self.heads % self.ulysses or self.kv_heads % self.ulysses:
            raise ValueError(f"heads ({self.heads}) and kv_heads ({self.kv_heads}) must be multiples of ulysses "
                             f"({self.ulysses}): DeepSpeed-Ulysses gives every rank heads / ulysses of each")
        load_ds_config(self)  # a missing or contradicting file is a configuration error too

    def degrees(self) -> dict:
        """The keyword degrees of ``sequence_parallel_groups`` beyond Ulysses and ring (none here)."""
        return {}

    def data_parallel(self, world_size) -> int:
        """The number of replicas in a world of ``world_size`` ranks."""
        return world_size // self.sp

    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step and replica."""
        return 1

    def ds_settings(self, world_size=None) -> dict:
        """The DeepSpeed config entries this command line decides (batch entries only with ``world_size``)."""
        steps = self.accumulation_steps()
        wanted = {"gradient_accumulation_steps": steps, "gradient_clipping": self.grad_clip}
        if world_size is not None:
            micro_batch = self.batch // (self.data_parallel(world_size) * steps)
            wanted |= {"train_batch_size": self.batch, "train_micro_batch_size_per_gpu": micro_batch}
        return wanted


def load_ds_config(cfg: DeepSpeedTrainConfig, world_size: int | None = None) -> dict:
    """The DeepSpeed config file with the entries ``cfg.ds_settings`` decides filled in (ValueError when the
    file sets them to something else). Without ``world_size`` the batch entries are not checked."""
    try:
        ds = json.loads(Path(cfg.deepspeed).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read the DeepSpeed config {cfg.deepspeed!r}: {error}") from None
    if not isinstance(ds, dict):
        raise ValueError(f"the DeepSpeed config {cfg.deepspeed!r} must hold a JSON object")
    for key, value in cfg.ds_settings(world_size).items():
        if key in ds and ds[key] != value:
            raise ValueError(f"{cfg.deepspeed}: {key} is {ds[key]!r} but this run needs {value!r} (from the command "
                             f"line and the world size); remove it from the file")
        ds[key] = value
    return ds


def parse_config(argv, rank, world_size, config_class=None, prog="launch.train_deepspeed",
                 description=__doc__) -> DeepSpeedTrainConfig:
    """The validated ``config_class`` (default DeepSpeedTrainConfig); a bad one exits (code 2) with one line on
    rank 0's stderr, silently elsewhere."""
    config_class = config_class or DeepSpeedTrainConfig
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n\n")[0])
    docs = {}
    for cls in reversed(config_class.__mro__[:-1]):  # TrainConfig first, then every subclass's fields
        docs |= field_docs(cls)
    for field in dataclasses.fields(config_class):
        if field.name in EXCLUDED:
            continue
        flags = [f"--{field.name.replace('_', '-')}"] + (["--deepspeed_config", "--deepspeed-config"]
                                                         if field.name == "deepspeed" else [])
        if isinstance(field.default, bool):  # a switch: argparse's type=bool would take "False" as true
            parser.add_argument(*flags, dest=field.name, action="store_true", help=docs[field.name])
            continue
        kind = str if field.default is None else type(field.default)
        parser.add_argument(*flags, dest=field.name, type=kind, default=field.default, help=docs[field.name])
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; ignored (LOCAL_RANK is used)")
    with contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext():
        args = vars(parser.parse_args(argv))
        args.pop("local_rank")
        try:
            cfg = config_class(**args)
            cfg.check_world(world_size)
            load_ds_config(cfg, world_size)
        except ValueError as error:
            parser.error(str(error))
    return cfg


# --------------------------------------------------------------------------------------------- model

def build_model(cfg, groups, device):
    """``launch.train``'s model (same seed, same initial parameters, same parameter names) with every
    attention layer running Ulysses x ring attention over ``groups``."""
    from dist_attn.integrations.deepspeed import UlyssesRingAttention

    torch.manual_seed(cfg.seed)
    core = UlyssesRingAttention(groups.ulysses_group, groups.ring_group, causal=True, layout=cfg.layout)
    model = Transformer(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.kv_heads,
                        attention=lambda q, k, v, layout, group: core(q, k, v))  # core holds layout and groups
    if cfg.checkpoint_layers:
        for block in model.blocks:
            checkpoint_layer(block)
    return model.to(device)


# ---------------------------------------------------------------------------------------------- data

def replica_batch(cfg, step, groups, device):
    """This rank's tokens of its replica's sequences (``shard_batch``): ids and labels (B, T_local),
    positions (T_local,), and the number of answer tokens in the replica's whole batch."""
    from dist_attn.integrations.deepspeed import shard_batch

    per_replica = cfg.batch // groups.dp_size
    first = groups.dp_rank * per_replica
    ids, labels = map(torch.stack, zip(*(make_sequence(cfg, step, i) for i in range(first, first + per_replica))))
    n_answers = int((labels != IGNORE).sum())
    local = shard_batch({"input_ids": ids, "labels": labels}, groups, cfg.layout)
    return (local["input_ids"].to(device), local["labels"].to(device), local["position_ids"].to(device),
            n_answers)


# ------------------------------------------------------------------------------------------ training

class DeepSpeedTrainResult(NamedTuple):
    losses: list[float]  # the loss of every step this run took (the same on every rank)
    checksum: float  # sum of all parameters in float64 (equal on every rank when replicas agree)
    grad_norms: list[float]  # the global gradient norm DeepSpeed computed at every step, before clipping


def ensure_world_env():
    """A world of one when nothing launched this process: the environment DeepSpeed reads."""
    if dist.is_initialized() or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def initialize_engine(cfg, model, **initialize_kwargs):
    """``deepspeed.initialize`` with ``launch.train``'s AdamW and learning rate (the lr of step i + 1 after i
    scheduler steps), resumed from ``cfg.resume`` when given. Returns (engine, the last step already taken)."""
    import deepspeed

    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(  # noqa: E731
        opt, lambda i: learning_rate(cfg, i + 1) / cfg.lr)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule,
                                           **initialize_kwargs)
    if not cfg.resume:
        return engine, 0
    path, client_state = engine.load_checkpoint(cfg.resume)
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint under {cfg.resume}")
    return engine, client_state["step"]


def run_steps(cfg, engine, start, rank, take_step, header) -> tuple[list[float], list[float]]:
    """Steps ``start + 1 .. cfg.steps``: ``take_step(step)`` trains one and returns the global loss; then the
    gradient norm DeepSpeed computed (before clipping), a log line every ``log_every`` steps, checkpoints.
    Rank 0 prints ``header`` first and shows a progress bar. Returns (losses, grad norms)."""
    log = tqdm.write if rank == 0 else (lambda line: None)
    log(f"{header}; steps {start + 1}..{cfg.steps}, {cfg.batch} x {cfg.seqlen} tokens each")
    losses, grad_norms, tokens_per_step = [], [], cfg.batch * cfg.seqlen
    window_start, window_steps = time.perf_counter(), 0
    for step in tqdm(range(start + 1, cfg.steps + 1), initial=start, total=cfg.steps, disable=rank != 0,
                     desc="train", unit="step"):
        losses.append(take_step(step))
        grad_norm = engine.get_global_grad_norm()
        grad_norms.append(float(grad_norm) if grad_norm is not None else float("nan"))
        window_steps += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - window_start
            log(f"step {step:>6} | loss {losses[-1]:.4f} | grad norm {grad_norms[-1]:.4f} | lr "
                f"{learning_rate(cfg, step):.2e} | {window_steps * tokens_per_step / elapsed:,.0f} tok/s (all ranks)")
            window_start, window_steps = time.perf_counter(), 0
        if cfg.save and (step == cfg.steps or cfg.save_every and step % cfg.save_every == 0):
            engine.save_checkpoint(cfg.save, tag=f"step{step}", client_state={"step": step})  # collective
    return losses, grad_norms


def train(cfg, groups, device, rank) -> DeepSpeedTrainResult:
    model = build_model(cfg, groups, device)
    engine, start = initialize_engine(cfg, model, config=load_ds_config(cfg, dist.get_world_size()), mpu=groups.mpu)

    def take_step(step):
        ids, labels, positions, n_answers = replica_batch(cfg, step, groups, device)
        outputs = engine(ids, positions, layout=cfg.layout, return_hidden=cfg.fused_loss)  # logits or hidden
        loss = loss_share(cfg, engine.module, outputs, labels, n_answers)
        engine.backward(loss)
        engine.step()
        reported = loss.detach().clone()
        dist.all_reduce(reported, group=groups.sp_dp_group)  # SP sum of each replica, summed over replicas
        return reported.item() / groups.dp_size

    header = (f"ZeRO stage {engine.zero_optimization_stage()}; dp {groups.dp_size} x ulysses {cfg.ulysses} x ring "
              f"{cfg.ring} ({cfg.layout}) on {device}; {sum(p.numel() for p in model.parameters()):,} parameters")
    losses, grad_norms = run_steps(cfg, engine, start, rank, take_step, header)
    checksum = sum(p.detach().double().sum().item() for p in engine.module.parameters())
    return DeepSpeedTrainResult(losses, checksum, grad_norms)


def launch_main(argv, train_fn, config_class=None, prog="launch.train_deepspeed", description=__doc__):
    """The entry point of a DeepSpeed training script: the validated config (before any process group), the
    default group (torchrun's, the caller's, or a world of one), DeepSpeed's comm on top of it, the groups of
    ``cfg.degrees()``, then ``train_fn(cfg, groups, device, rank)``."""
    rank, world_size = launch_world()
    cfg = parse_config(argv, rank, world_size, config_class, prog, description)
    device = pick_device(cfg.device)
    ensure_world_env()
    created = init_distributed(device)

    import deepspeed
    from dist_attn.groups import sequence_parallel_groups

    deepspeed.init_distributed(dist_backend=dist.get_backend())  # wraps the existing default group
    groups = sequence_parallel_groups(cfg.ulysses, cfg.ring, **cfg.degrees())
    try:
        return train_fn(cfg, groups, device, rank)
    finally:
        if created:
            dist.destroy_process_group()


def main(argv=None) -> DeepSpeedTrainResult:
    return launch_main(argv, train)


if __name__ == "__main__":
    main()
