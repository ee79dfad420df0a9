"""DeepSpeed pipeline parallelism composed with sequence (Ulysses x ring), data and tensor parallelism.

``SequenceParallelPipelineModule`` is a ``deepspeed.pipe.PipelineModule`` over the mesh of
``dist_attn.groups.sequence_parallel_groups(..., pipeline=p, tensor=t)``: every rank of a stage's sequence
group runs that stage's layers on its share of the tokens, and the pipeline engine passes each rank's
activations to the rank at the same (replica, sequence, tensor) coordinates in the next stage::

    groups = sequence_parallel_groups(ulysses_degree=1, ring_degree=2, pipeline=2)     # every rank
    module = SequenceParallelPipelineModule(layers, groups, config=ds_config, loss_fn=loss_fn)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    loss = module.global_loss(engine.train_batch(micro_batches))   # the global mean loss, on every rank

Contract for the layers and the data:

- Layers pass ``(hidden, positions)``: positions are this rank's global token positions (integers, no
  grad), which RoPE and the ring's layout need in every stage. Micro-batches of different lengths (packed
  sequences) need ``dynamic_shape=True``.
- The data iterator yields ``((input_ids, positions), (labels, scale))`` per micro-batch, this rank's
  tokens placed by ``dist_attn.usp_shard`` (``shard_batch``); ``loss_fn(outputs, (labels, scale))`` returns
  this rank's share of the global mean loss: the loss summed over its tokens times ``scale`` =
  ``micro_batches * dp / (valid targets in the global batch)``. DeepSpeed averages micro-batches (divides by
  their number) and ZeRO sums gradients over the sequence ranks and averages replicas (divides by dp),
  which leaves exactly the global mean's gradient.
- The loss ``engine.train_batch`` returns is this rank's share; ``global_loss`` sums it over the sequence
  group.

What this class makes impossible (each was measured silently wrong or hanging with DeepSpeed 0.19):

- DeepSpeed's own grid as the mpu (gradients never summed over sequence ranks; a model-parallel group over
  pipe x sequence ranks over-counts the gradient norm by sqrt(sp)): ``mpu()`` returns ``groups.mpu``.
- ZeRO stage 0 with sequence parallelism (the pipeline engine reduces over the data-parallel group only),
  ZeRO 2/3 (the pipeline engine does not support them), bf16 with ``data_types.grad_accum_dtype`` fp32
  (DeepSpeed's ``BF16_Optimizer`` then updates partitions with one rank's partial gradient): refused.
- ``TiedLayerSpec`` (tie groups built from different rank lists on different sequence ranks: a hang):
  refused.
- Layer checkpoint files written by every sequence rank (resume then fails): only sequence rank 0 writes,
  named by tensor rank alone, and every rank loads.
- Pipeline collectives over groups made without a timeout (gloo's 30 minutes): the engine's pipe,
  data-parallel and tensor groups are replaced by ``groups``' (same ranks, the default group's timeout).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule, TiedLayerSpec

from dist_attn.groups import SequenceParallelGroups

DTYPE_NAMES_FP32 = ("fp32", "float32", "float", "torch.float32")


def _load_config(config) -> dict:
    if isinstance(config, (str, os.PathLike)):
        try:
            return json.loads(Path(config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"config: cannot read the DeepSpeed config {str(config)!r}: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(f"config must be a DeepSpeed config dict or a path to one; got {type(config).__name__}")
    return config


def _enabled(section) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def check_pipeline_config(config, groups: SequenceParallelGroups) -> dict:
    """The DeepSpeed config (a dict, or a JSON file) if it trains correctly under the pipeline engine with
    ``groups``; ValueError naming the setting otherwise."""
    config = _load_config(config)
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage in (2, 3):
        raise ValueError(f"zero_optimization.stage is {stage}: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1 "
                         f"only; use stage 1")
    if stage != 1 and groups.sp_size > 1:
        raise ValueError(f"zero_optimization.stage is {stage}: with sequence parallelism (sp = {groups.sp_size}) the "
                         f"pipeline engine needs ZeRO stage 1, which reduces gradients over the sequence x data "
                         f"ranks; stage 0 reduces over the data-parallel ranks only (wrong gradients)")
    grad_accum = str(config.get("data_types", {}).get("grad_accum_dtype", "")).lower()
    bf16 = _enabled(config.get("bf16")) or _enabled(config.get("bfloat16"))  # DeepSpeed reads both names
    if bf16 and grad_accum in DTYPE_NAMES_FP32:
        raise ValueError("data_types.grad_accum_dtype is fp32 with bf16 enabled: DeepSpeed then picks its "
                         "BF16_Optimizer, which updates each partition with one rank's partial gradient under sequence "
                         "parallelism; remove data_types.grad_accum_dtype (ZeRO stage 1 keeps fp32 master weights)")
    return config


class SequenceParallelPipelineModule(PipelineModule):
    """A ``PipelineModule`` whose stages run sequence-parallel (and tensor-parallel) over ``groups``.

    ``layers``: as for ``PipelineModule`` (``LayerSpec`` or modules); ``groups``: from
    ``sequence_parallel_groups(..., pipeline=p, tensor=t)`` (its pipeline degree is the number of stages);
    ``config``: the DeepSpeed config (dict or path) that will be given to ``deepspeed.initialize``, checked
    here (``check_pipeline_config``). Other keyword arguments go to ``PipelineModule`` (``loss_fn``,
    ``partition_method``, ``activation_checkpoint_interval``, ``checkpointable_layers``, ``dynamic_shape``, ...);
    ``num_stages`` and ``topology`` come from ``groups``.
    """

    def __init__(self, layers, groups: SequenceParallelGroups, *, config, **kwargs):
        if not isinstance(groups, SequenceParallelGroups):
            raise ValueError(f"groups must be a dist_attn.groups.SequenceParallelGroups; got {type(groups).__name__}")
        taken = sorted({"num_stages", "topology"} & kwargs.keys())
        if taken:
            raise ValueError(f"{', '.join(taken)}: the pipeline topology comes from groups (pipeline="
                             f"{groups.pipe_size}); do not pass it")
        tied = [i for i, layer in enumerate(layers) if isinstance(layer, TiedLayerSpec)]
        if tied:
            raise ValueError(f"layers {tied} are TiedLayerSpec: tied weights across stages are not supported with "
                             f"sequence parallelism (DeepSpeed would build the tie groups from different rank lists "
                             f"on different sequence ranks and hang); untie them")
        self.ds_config = check_pipeline_config(config, groups)
        self.groups = groups
        super().__init__(layers, topology=groups.topology(), **kwargs)
        self._use_our_groups()

    def _use_our_groups(self):
        """The engine's collectives over the grid's pipe, data-parallel and tensor groups go over ours: the
        same ranks, with the default group's timeout."""
        grid, ours = self._grid, self.groups
        for attr, group in (("pp_proc_group", ours.pipe_group), ("dp_proc_group", ours.dp_group),
                            ("slice_proc_group", ours.tensor_group)):
            if dist.get_process_group_ranks(getattr(grid, attr)) != dist.get_process_group_ranks(group):
                raise RuntimeError(f"DeepSpeed's grid {attr} differs from dist_attn's: the topologies disagree")
            setattr(grid, attr, group)

    def mpu(self):
        """The model-parallel unit ``deepspeed.initialize`` takes from a pipeline module: ours, whose ZeRO group
        spans the sequence x data ranks of a stage and whose model-parallel group is pipe x tensor."""
        return self.groups.mpu

    def global_loss(self, loss) -> torch.Tensor:
        """The loss ``engine.train_batch`` returned, summed over the sequence group: the global mean loss."""
        total = loss.detach().clone().float()
        dist.all_reduce(total, group=self.groups.sp_group)
        return total

    def ckpt_layer_path(self, ckpt_dir, local_layer_idx):
        """``layer_XX[-model_TT]-model_states.pt``: one file per layer and tensor rank (the sequence ranks
        hold the same weights and share it)."""
        name = f"layer_{local_layer_idx + self._local_start:02d}"
        if self.groups.tensor_size > 1:
            name += f"-model_{self.groups.tensor_rank:02d}"
        return os.path.join(ckpt_dir, name + "-model_states.pt")

    def save_state_dict(self, save_dir, checkpoint_engine, exclude_frozen_params=False):
        if self.groups.sp_rank == 0:  # and, inside, data-parallel rank 0
            super().save_state_dict(save_dir, checkpoint_engine, exclude_frozen_params)
