"""``launch.train``'s model and task under DeepSpeed's pipeline engine: pipeline x data x Ulysses x ring x tensor.

The world of ``pipeline x dp x ring x ulysses x tensor`` ranks is split by
``dist_attn.groups.sequence_parallel_groups`` (tensor fastest, pipeline slowest). The ``launch.model``
transformer is cut into pipeline layers (embedding, every block, norm + head: ``launch.model.pipeline_layers``)
that DeepSpeed partitions into ``--pipeline`` stages (``dist_attn.integrations.deepspeed_pipeline.
SequenceParallelPipelineModule``); with ``--tensor`` every block is split Megatron-style
(``launch.model.tensor_parallel_``) and each tensor rank runs the attention of its heads; attention is
ring attention over the ring group, inside DeepSpeed-Ulysses' all-to-all when ``--ulysses`` > 1. ZeRO stage 1
(``launch/ds_pipeline.json``), ``--micro-batches`` per step (1F1B schedule), ``--checkpoint-layers``
recomputes every block in the backward but not its ring (``dist_attn.checkpoint_layer``), ``--dtype bf16``
trains in bf16 (fp32 master weights in ZeRO).

    torchrun --nproc_per_node 4 -m launch.train_pipeline --pipeline 2 --ring 2
    torchrun --nproc_per_node 4 -m launch.train_pipeline --pipeline 2 --tensor 2 --micro-batches 4 --batch 8
    torchrun --nproc_per_node 8 -m launch.train_pipeline --pipeline 2 --ulysses 2 --ring 2 --dtype bf16
    deepspeed --num_gpus 4 --module launch.train_pipeline --pipeline 4 --micro-batches 4
    python -m launch.train_pipeline --help

Data, loss and learning rate are ``launch.train``'s: sequence i of step s depends only on (seed, s, i);
replica d takes sequences ``[d * batch / dp, (d + 1) * batch / dp)``, cut into ``micro_batches`` micro-batches.
Each rank's loss is the cross-entropy summed over its tokens times ``micro_batches * dp / (answer tokens of
the global batch)``: DeepSpeed's average over micro-batches, ZeRO's sum over sequence ranks and average over
replicas then give the gradient of the global mean loss, so losses and gradient norms equal a one-process
``python -m launch.train`` run with the same seed and batch.

``--save DIR`` / ``--resume DIR``: DeepSpeed checkpoints (layer files from sequence rank 0, one per tensor
rank; optimizer partitions per rank); a resumed run continues bit for bit on the same world.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_attn import checkpoint_layer, linear_cross_entropy
from launch.model import BlockStage, Transformer, pipeline_layers, tensor_parallel_
from launch.train import IGNORE, make_sequence
from launch.train_deepspeed import REPO, DeepSpeedTrainConfig, initialize_engine, launch_main, load_ds_config, \
    run_steps

DEFAULT_PIPELINE_CONFIG = str(REPO / "launch" / "ds_pipeline.json")
DTYPES = ("bf16", "fp32")


@dataclasses.dataclass
class PipelineTrainConfig(DeepSpeedTrainConfig):
    pipeline: int = 1
    """Pipeline stages (the slowest axis): the layers are partitioned over this many ranks."""
    tensor: int = 1
    """Tensor-parallel degree (the fastest axis): splits heads, kv_heads and the MLP."""
    micro_batches: int = 1
    """Micro-batches per step and replica (DeepSpeed's gradient accumulation steps; 1F1B schedule)."""
    checkpoint_layers: bool = False
    """Recompute every transformer block's activations in the backward, not its ring (dist_attn.checkpoint_layer)."""
    dtype: str = "fp32"
    """fp32 or bf16 (DeepSpeed bf16: bf16 weights and activations, fp32 master weights in ZeRO-1)."""
    deepspeed: str = DEFAULT_PIPELINE_CONFIG
    """DeepSpeed config (JSON): ZeRO stage 1 and the like; batch, accumulation, clipping and bf16 come from here."""

    def __post_init__(self):
        for name in ("pipeline", "tensor", "micro_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        super().__post_init__()  # the model, Ulysses and ring checks
        if self.heads % self.tensor or self.kv_heads % self.tensor:
            raise ValueError(f"heads ({self.heads}) and kv_heads ({self.kv_heads}) must be multiples of tensor "
                             f"({self.tensor}): every tensor rank takes whole heads")
        local_heads, local_kv_heads = self.heads // self.tensor, self.kv_heads // self.tensor
        if local_heads % self.ulysses or local_kv_heads % self.ulysses:
            raise ValueError(f"heads / tensor ({local_heads}) and kv_heads / tensor ({local_kv_heads}) must be "
                             f"multiples of ulysses ({self.ulysses})")

    def degrees(self) -> dict:
        return {"pipeline": self.pipeline, "tensor": self.tensor}

    def data_parallel(self, world_size) -> int:
        return world_size // (self.pipeline * self.sp * self.tensor)

    def check_world(self, world_size):
        ranks = self.pipeline * self.sp * self.tensor
        if world_size % ranks:
            raise ValueError(f"pipeline x ulysses x ring x tensor ({self.pipeline} x {self.ulysses} x {self.ring} x "
                             f"{self.tensor} = {ranks}) must divide the world size ({world_size})")
        dp = self.data_parallel(world_size)
        if self.batch % (dp * self.micro_batches):
            raise ValueError(f"batch ({self.batch}) must be a multiple of data parallel x micro_batches "
                             f"({dp} x {self.micro_batches})")

    def accumulation_steps(self) -> int:
        return self.micro_batches

    def ds_settings(self, world_size=None) -> dict:
        return super().ds_settings(world_size) | {"bf16": {"enabled": self.dtype == "bf16"}}


# --------------------------------------------------------------------------------------------- model

def build_module(cfg, groups, device):
    """``launch.train``'s model (same seed, so the same initial parameters), split over the tensor ranks and
    cut into pipeline layers, as a SequenceParallelPipelineModule over ``groups``."""
    from dist_attn.integrations.deepspeed import UlyssesRingAttention
    from dist_attn.integrations.deepspeed_pipeline import SequenceParallelPipelineModule

    torch.manual_seed(cfg.seed)
    if cfg.ulysses > 1:
        core = UlyssesRingAttention(groups.ulysses_group, groups.ring_group, causal=True, layout=cfg.layout)
        attention = lambda q, k, v, layout, group: core(q, k, v)  # noqa: E731; core holds layout and groups
    else:
        attention = None  # the model's own causal ring attention over the ring group
    model = Transformer(cfg.vocab, cfg.dim, cfg.layers, cfg.heads, cfg.kv_heads, attention=attention)
    if cfg.tensor > 1:
        tensor_parallel_(model, groups.tensor_group)
    layers = pipeline_layers(model.to(device), cfg.layout, groups.ring_group, fused_head=cfg.fused_loss)
    if cfg.checkpoint_layers:  # ours, not DeepSpeed's activation checkpointing (which would re-run the ring)
        for layer in layers:
            if isinstance(layer, BlockStage):
                checkpoint_layer(layer)
    return SequenceParallelPipelineModule(
        layers, groups, config=load_ds_config(cfg, dist.get_world_size()), loss_fn=share_of_loss,
        partition_method="uniform")


def share_of_loss(outputs, target):
    """This rank's share of the global mean loss: cross-entropy summed over its tokens, times ``scale``. ``outputs``:
    the logits, or (hidden states, head weight) from a fused head (``--fused-loss``: no logits are made)."""
    labels, scale = target
    if isinstance(outputs, tuple):
        hidden, weight = outputs
        return linear_cross_entropy(hidden, weight, labels, num_items_in_batch=1, ignore_index=IGNORE) * scale
    return F.cross_entropy(outputs.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                           reduction="sum") * scale


# ---------------------------------------------------------------------------------------------- data

def micro_batches(cfg, step, groups, device):
    """This rank's micro-batches of step ``step``: ``((ids, positions), (labels, scale))`` each, ids and
    labels (B_micro, T_local) placed by ``shard_batch``, positions (T_local,), scale as in the module doc."""
    from dist_attn.integrations.deepspeed import shard_batch

    sequences = [make_sequence(cfg, step, i) for i in range(cfg.batch)]
    n_answers = sum(int((labels != IGNORE).sum()) for _, labels in sequences)  # the global batch's
    dp, m = groups.dp_size, cfg.micro_batches
    scale = torch.tensor(m * dp / n_answers, dtype=torch.float32, device=device)
    per_micro = cfg.batch // (dp * m)
    first = groups.dp_rank * cfg.batch // dp
    out = []
    for j in range(m):
        ids, labels = map(torch.stack, zip(*sequences[first + j * per_micro:first + (j + 1) * per_micro]))
        local = shard_batch({"input_ids": ids, "labels": labels}, groups, cfg.layout)
        out.append(((local["input_ids"].to(device), local["position_ids"].to(device)),
                    (local["labels"].to(device), scale)))
    return out


# ------------------------------------------------------------------------------------------ training

class PipelineTrainResult(NamedTuple):
    losses: list[float]  # the global mean loss of every step this run took (the same on every rank)
    checksum: float  # sum of the whole model's parameters in float64 (over stages and tensor shards)
    grad_norms: list[float]  # the global gradient norm DeepSpeed computed at every step, before clipping


def model_checksum(module, groups) -> float:
    """Sum of every parameter of the whole model: this stage's, tensor-split ones from every tensor rank,
    replicated ones once; summed over the pipe x tensor ranks."""
    local = sum(p.detach().double().sum() for p in module.parameters()
                if getattr(p, "tensor_model_parallel", False) or groups.tensor_rank == 0)
    total = torch.as_tensor(local, dtype=torch.float64).reshape(1)
    dist.all_reduce(total, group=groups.model_parallel_group)
    return total.item()


def train(cfg, groups, device, rank) -> PipelineTrainResult:
    module = build_module(cfg, groups, device)
    engine, start = initialize_engine(cfg, module, config=module.ds_config)

    def take_step(step):
        return module.global_loss(engine.train_batch(iter(micro_batches(cfg, step, groups, device)))).item()

    header = (f"pipeline {groups.pipe_size} x dp {groups.dp_size} x ring {cfg.ring} ({cfg.layout}) x ulysses "
              f"{cfg.ulysses} x tensor {cfg.tensor}, ZeRO stage {engine.zero_optimization_stage()}, {cfg.dtype} on "
              f"{device}; {cfg.micro_batches} micro-batches")
    losses, grad_norms = run_steps(cfg, engine, start, rank, take_step, header)
    return PipelineTrainResult(losses, model_checksum(module, groups), grad_norms)


def main(argv=None) -> PipelineTrainResult:
    return launch_main(argv, train, PipelineTrainConfig, "launch.train_pipeline", __doc__)


if __name__ == "__main__":
    main()
