"""Process groups for pipeline x data x sequence (ring x Ulysses) x tensor parallelism, and DeepSpeed's view.

A world of ``p * dp * r * u * t`` ranks is a mesh of five axes, pipeline slowest, tensor fastest::

    rank = (((pipe_rank * dp + dp_rank) * r + ring_rank) * u + ulysses_rank) * t + tensor_rank

- tensor axis (degree t, fastest: one node, the fastest links): Megatron-style tensor parallelism; the
  t ranks split every layer's heads and MLP columns and all-reduce twice per layer.
- Ulysses axis (degree u): ranks ``t`` apart that exchange heads for sequence with all-to-alls
  (``dist_attn.ulysses``).
- ring axis (degree r): ranks ``u * t`` apart that pass K/V blocks around a ring (``dist_attn.ring_attention``).
- data-parallel axis (degree dp): replicas of the model, each holding its own sequences.
- pipeline axis (degree p, slowest: stage-to-stage traffic is the smallest): stages of the layer stack.

The u*r ranks of one stage, replica and tensor rank form its sequence-parallel (SP) group: together they
hold one sequence, placed by ``dist_attn.usp_shard``. With ``pipeline=tensor=1`` this is the layout of a
``u x r x dp`` world. Example, world 8 = u 2 x r 2 x dp 2::

    ulysses groups  [0 1] [2 3] [4 5] [6 7]
    ring groups     [0 2] [1 3] [4 6] [5 7]
    sp groups       [0 1 2 3] [4 5 6 7]
    dp groups       [0 4] [1 5] [2 6] [3 7]

and world 8 = pipeline 2 x ring 2 x tensor 2: sp groups [0 2] [1 3] [4 6] [5 7], tensor groups [0 1] [2 3]
..., pipe groups [0 4] [1 5] [2 6] [3 7], ZeRO (SP x DP) groups [0 2] [1 3] [4 6] [5 7], model-parallel
(pipe x tensor) groups [0 1 4 5] [2 3 6 7].

``sequence_parallel_groups`` validates its arguments before it creates anything (a bad configuration
raises ``ValueError`` on the ranks that see it and never leaves peers waiting in a half-made
collective), then creates every group on every rank in the same order (``new_group`` is collective),
each with the default group's timeout (``new_group`` would otherwise give gloo's 30 minutes).

``DeepSpeedMPU`` (``groups.mpu``) is the model-parallel-unit object DeepSpeed takes
(``deepspeed.initialize(mpu=...)``, or ``PipelineModule.mpu()`` under the pipeline engine): it tells ZeRO
to partition and reduce gradients over the SP x DP ranks of one stage and tensor rank and to average them
over the dp replicas only (DeepSpeed divides the SP x DP sum by ``sp_size``), which is right when every
rank's loss is its share of its replica's loss (the SP ranks' losses add up to the replica's); and its
model-parallel group is pipe x tensor, so the gradient norm counts every stage and tensor shard once.

    groups = sequence_parallel_groups(ulysses_degree=2, ring_degree=2)   # every rank, after init_process_group
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=groups.mpu)
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
from typing import Any, NamedTuple

import torch.distributed as dist

from dist_attn.comm import group_timeout_s


class Coordinates(NamedTuple):
    """A rank's place on every axis (or, as ``degrees``, the size of every axis), slowest axis first."""

    pipe: int
    data: int
    ring: int
    ulysses: int
    tensor: int


def mesh_coordinates(rank, degrees: Coordinates) -> Coordinates:
    """The coordinates of global ``rank`` in a mesh of ``degrees``: the inverse of ``mesh_rank``."""
    coords = []
    for size in reversed(degrees):
        rank, coord = divmod(rank, size)
        coords.append(coord)
    return Coordinates(*reversed(coords))


def mesh_rank(coords: Coordinates, degrees: Coordinates) -> int:
    """Global rank of ``coords``: ``(((pipe * dp + data) * r + ring) * u + ulysses) * t + tensor``."""
    rank = 0
    for coord, size in zip(coords, degrees):
        rank = rank * size + coord
    return rank


def _check_degree(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def check_degrees(ulysses_degree, ring_degree, data_parallel, world_size, *, pipeline=1, tensor=1) -> int:
    """The data-parallel degree of a valid configuration; ValueError naming the numbers otherwise.
    Pure arithmetic: no process group needed (usable before ``init_process_group``)."""
    named = {"ulysses_degree": ulysses_degree, "ring_degree": ring_degree, "pipeline": pipeline, "tensor": tensor}
    for name, value in named.items():
        _check_degree(name, value)
    if data_parallel is not None:
        _check_degree("data_parallel", data_parallel)
    shown = {"ulysses_degree": ulysses_degree, "ring_degree": ring_degree}
    shown |= {name: named[name] for name in ("pipeline", "tensor") if named[name] > 1}
    model = ulysses_degree * ring_degree * pipeline * tensor
    product = " x ".join(shown)
    values = " x ".join(str(v) for v in shown.values())
    if data_parallel is None:
        if world_size % model:
            raise ValueError(f"{product} ({values} = {model}) must divide the world size ({world_size})")
        return world_size // model
    if model * data_parallel != world_size:
        raise ValueError(f"{product} x data_parallel ({values} x {data_parallel} = {model * data_parallel}) "
                         f"must equal the world size ({world_size})")
    return data_parallel


AXIS_GROUPS = {  # group name: the axes its members differ in (the other coordinates are this rank's)
    "ulysses_group": ("ulysses",),
    "ring_group": ("ring",),
    "sp_group": ("ring", "ulysses"),
    "dp_group": ("data",),
    "sp_dp_group": ("data", "ring", "ulysses"),
    "pipe_group": ("pipe",),
    "tensor_group": ("tensor",),
    "model_parallel_group": ("pipe", "tensor"),
}


def axis_rank_lists(degrees: Coordinates, varying) -> list[list[int]]:
    """Every group whose members differ only in the ``varying`` axes, each as its ascending global ranks
    (so a member's index is its coordinate on those axes, slowest first), in a fixed order."""
    lists = {}
    for coords in itertools.product(*(range(n) for n in degrees)):
        fixed = tuple(c for c, axis in zip(coords, Coordinates._fields) if axis not in varying)
        lists.setdefault(fixed, []).append(mesh_rank(Coordinates(*coords), degrees))
    return list(lists.values())


@dataclasses.dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's process groups and coordinates in the (pipe, dp, ring, ulysses, tensor) mesh. Every group
    is a real process group, also when its degree is 1 (a group of this rank alone)."""

    ulysses_group: Any
    """The u ranks that exchange heads for sequence (Ulysses all-to-all); pass it as ``ulysses_group`` to
    ``usp_attention`` or as the sequence group of DeepSpeed's ``DistributedAttention``."""
    ring_group: Any
    """The r ranks whose K/V blocks travel around one ring (``ring_attention``'s ``group``)."""
    sp_group: Any
    """The u*r ranks that hold one sequence together (one stage's, replica's and tensor rank's
    sequence-parallel group)."""
    dp_group: Any
    """The dp ranks with the same coordinates in every replica: they hold the same positions of different
    sequences, in the same stage and tensor shard."""
    sp_dp_group: Any
    """The u*r*dp ranks of one stage and tensor rank, which hold replicas of the same parameters: ZeRO
    partitions optimizer state and reduces gradients over it (DeepSpeed's "sequence data parallel" group)."""
    pipe_group: Any
    """The p ranks, one per stage, that pass activations down the pipeline (same replica, sequence and
    tensor coordinates)."""
    tensor_group: Any
    """The t ranks that split every layer's heads and MLP columns (tensor parallelism)."""
    model_parallel_group: Any
    """The p*t ranks (pipe x tensor) that together hold one copy of the whole model: DeepSpeed sums the
    gradient norm over it."""
    coords: Coordinates
    """This rank's coordinate on every axis."""
    degrees: Coordinates
    """The size of every axis."""

    ulysses_rank = property(lambda self: self.coords.ulysses, doc="Rank in ulysses_group.")
    ulysses_size = property(lambda self: self.degrees.ulysses, doc="Ulysses degree u.")
    ring_rank = property(lambda self: self.coords.ring, doc="Rank in ring_group: this rank's ring shard.")
    ring_size = property(lambda self: self.degrees.ring, doc="Ring degree r.")
    dp_rank = property(lambda self: self.coords.data, doc="Rank in dp_group: which replica this rank serves.")
    dp_size = property(lambda self: self.degrees.data, doc="Data-parallel degree: the number of replicas.")
    pipe_rank = property(lambda self: self.coords.pipe, doc="Rank in pipe_group: this rank's pipeline stage.")
    pipe_size = property(lambda self: self.degrees.pipe, doc="Pipeline degree p: the number of stages.")
    tensor_rank = property(lambda self: self.coords.tensor, doc="Rank in tensor_group: this rank's shard.")
    tensor_size = property(lambda self: self.degrees.tensor, doc="Tensor-parallel degree t.")

    @property
    def sp_rank(self) -> int:
        """Rank in sp_group (= ring_rank * u + ulysses_rank)."""
        return self.ring_rank * self.ulysses_size + self.ulysses_rank

    @property
    def sp_size(self) -> int:
        """u * r: the ranks that share one sequence."""
        return self.ulysses_size * self.ring_size

    @property
    def mpu(self) -> "DeepSpeedMPU":
        """The object for ``deepspeed.initialize(mpu=...)`` (creates nothing)."""
        return DeepSpeedMPU(self)

    def topology(self):
        """DeepSpeed's ``ProcessTopology`` of this mesh (axes pipe, data, ring, ulysses, model: DeepSpeed
        calls the tensor axis "model"), with the same rank of every coordinate; for ``PipelineModule``."""
        from deepspeed.runtime.pipe.topology import ProcessTopology

        return ProcessTopology(axes=["pipe", "data", "ring", "ulysses", "model"], dims=list(self.degrees))

    def rank_at(self, **coords) -> int:
        """The global rank at this rank's coordinates with ``coords`` (axis=value) replaced."""
        return mesh_rank(self.coords._replace(**coords), self.degrees)


def sequence_parallel_groups(ulysses_degree, ring_degree, data_parallel=None, *, pipeline=1,
                             tensor=1) -> SequenceParallelGroups:
    """Creates the groups of a ``pipeline x dp x ring x ulysses x tensor`` mesh and returns this rank's (a
    collective: every rank of the default group calls it with the same arguments).

    ``data_parallel=None`` takes ``world_size / (pipeline * r * u * tensor)``. Raises ValueError, before
    creating any group, when a degree is not an int >= 1 or the degrees do not multiply to the world size;
    RuntimeError when torch.distributed is not initialised. Every group gets the default group's timeout.
    """
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree), ("pipeline", pipeline),
                        ("tensor", tensor)):
        _check_degree(name, value)
    if data_parallel is not None:
        _check_degree("data_parallel", data_parallel)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_groups needs an initialised default process group "
                           "(torch.distributed.init_process_group)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dp = check_degrees(ulysses_degree, ring_degree, data_parallel, world_size, pipeline=pipeline, tensor=tensor)
    degrees = Coordinates(pipeline, dp, ring_degree, ulysses_degree, tensor)
    timeout = group_timeout_s()
    timeout = datetime.timedelta(seconds=timeout) if timeout else None
    mine = {}
    for name, varying in AXIS_GROUPS.items():  # every rank creates every group, in this fixed order
        for ranks in axis_rank_lists(degrees, varying):
            group = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                mine[name] = group
    return SequenceParallelGroups(**mine, coords=mesh_coordinates(rank, degrees), degrees=degrees)


class DeepSpeedMPU:
    """DeepSpeed's "model parallel unit" for pipeline x data x Ulysses x ring x tensor parallelism. Pass it
    as ``deepspeed.initialize(..., mpu=groups.mpu)`` (``SequenceParallelPipelineModule.mpu()`` returns it
    under the pipeline engine).

    What DeepSpeed does with it (deepspeed.utils.groups, runtime/engine.py, runtime/zero/stage_1_and_2.py,
    runtime/pipe/engine.py):

    - ``get_sequence_data_parallel_group``: ZeRO partitions optimizer state (and gradients, stage 2) over
      it and reduces gradients over it; the engine broadcasts the initial parameters over it.
    - ``get_sequence_parallel_world_size``: gradients summed over the SP x DP group are divided by
      ``sp_dp_size / sp_size = dp``: summed over SP, averaged over replicas.
    - ``get_data_parallel_world_size``: the number of replicas, for the batch-size arithmetic
      (``train_batch_size = micro_batch * grad_accum * dp``), data samplers and the pipeline's loss average.
    - ``get_model_parallel_*``: pipe x tensor. ZeRO sums the squared gradient norm of its partitions over
      the SP x DP group, then over this group; parameters not marked ``tensor_model_parallel`` are counted
      on tensor rank 0 only (``get_tensor_model_parallel_rank``).
    - ``get_pipe_parallel_group``: the pipeline engine broadcasts the loss from the last stage over it.

    Creates no group (all come from ``sequence_parallel_groups``).
    """

    def __init__(self, groups: SequenceParallelGroups):
        self.groups = groups

    # Sequence parallelism: the whole u*r sequence group (Ulysses x ring).
    def get_sequence_parallel_group(self):
        return self.groups.sp_group

    def get_sequence_parallel_world_size(self):
        return self.groups.sp_size

    def get_sequence_parallel_rank(self):
        return self.groups.sp_rank

    # Sequence x data parallelism: the ranks holding a replica of this stage's (tensor shard's) parameters.
    def get_sequence_data_parallel_group(self):
        return self.groups.sp_dp_group

    def get_sequence_data_parallel_world_size(self):
        return self.groups.sp_size * self.groups.dp_size

    def get_sequence_data_parallel_rank(self):
        return self.groups.dp_rank * self.groups.sp_size + self.groups.sp_rank

    # Data parallelism: one rank per replica (the ranks at the same sequence position).
    def get_data_parallel_group(self):
        return self.groups.dp_group

    def get_data_parallel_world_size(self):
        return self.groups.dp_size

    def get_data_parallel_rank(self):
        return self.groups.dp_rank

    def get_data_parallel_group_ranks(self):
        return [self.groups.rank_at(data=d) for d in range(self.groups.dp_size)]

    # Model parallelism: the pipe x tensor ranks that together hold one copy of the model.
    def get_model_parallel_group(self):
        return self.groups.model_parallel_group

    def get_model_parallel_world_size(self):
        return self.groups.pipe_size * self.groups.tensor_size

    def get_model_parallel_rank(self):
        return self.groups.pipe_rank * self.groups.tensor_size + self.groups.tensor_rank

    def get_tensor_model_parallel_group(self):
        return self.groups.tensor_group

    def get_tensor_model_parallel_world_size(self):
        return self.groups.tensor_size

    def get_tensor_model_parallel_rank(self):
        return self.groups.tensor_rank

    def get_tensor_model_parallel_src_rank(self):
        return self.groups.rank_at(tensor=0)

    def get_pipeline_model_parallel_group(self):
        return self.groups.pipe_group

    def get_pipeline_model_parallel_world_size(self):
        return self.groups.pipe_size

    def get_pipeline_model_parallel_rank(self):
        return self.groups.pipe_rank

    # The pipeline engine's names for the same (PipelineParallelGrid's).
    get_pipe_parallel_group = get_pipeline_model_parallel_group
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_slice_parallel_group = get_tensor_model_parallel_group
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_rank = get_tensor_model_parallel_rank

    # The two axes of the sequence group, for users of this object.
    def get_ulysses_group(self):
        return self.groups.ulysses_group

    def get_ring_group(self):
        return self.groups.ring_group

    def __repr__(self):
        g = self.groups
        return (f"DeepSpeedMPU(pipe {g.pipe_rank}/{g.pipe_size}, dp {g.dp_rank}/{g.dp_size}, ring "
                f"{g.ring_rank}/{g.ring_size}, ulysses {g.ulysses_rank}/{g.ulysses_size}, tensor "
                f"{g.tensor_rank}/{g.tensor_size})")
