"""Process groups for Ulysses x ring sequence parallelism x data parallelism, and DeepSpeed's view of them.

A world of ``u * r * dp`` ranks is a mesh of three axes, Ulysses fastest::

    rank = dp_rank * (r * u) + ring_rank * u + ulysses_rank

- Ulysses axis (degree u): adjacent ranks (one node, fast links) that exchange heads for sequence with
  all-to-alls (``dist_attn.ulysses``).
- ring axis (degree r): ranks ``u`` apart that pass K/V blocks around a ring (``dist_attn.ring_attention``).
- data-parallel axis (degree dp): replicas of the model, each holding its own sequences.

The u*r ranks of one replica form its sequence-parallel (SP) group: together they hold one sequence,
placed by ``dist_attn.usp_shard``. Example, world 8 = u 2 x r 2 x dp 2::

    ulysses groups  [0 1] [2 3] [4 5] [6 7]
    ring groups     [0 2] [1 3] [4 6] [5 7]
    sp groups       [0 1 2 3] [4 5 6 7]
    dp groups       [0 4] [1 5] [2 6] [3 7]

``sequence_parallel_groups`` validates its arguments before it creates anything (a bad configuration
raises ``ValueError`` on the ranks that see it and never leaves peers waiting in a half-made
collective), then creates every group on every rank in the same order (``new_group`` is collective).

``DeepSpeedMPU`` (``groups.mpu``) is the model-parallel-unit object ``deepspeed.initialize(mpu=...)``
takes: it tells ZeRO to partition and reduce gradients over all SP x DP ranks and to average them over
the dp replicas only (DeepSpeed divides the SP x DP sum by ``sp_size``), which is right when every rank's
loss is its share of its replica's loss (the SP ranks' losses add up to the replica's).

    groups = sequence_parallel_groups(ulysses_degree=2, ring_degree=2)   # every rank, after init_process_group
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg, mpu=groups.mpu)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist


def mesh_coordinates(rank, ulysses_degree, ring_degree):
    """(ulysses_rank, ring_rank, dp_rank) of global ``rank``: the inverse of the rank formula."""
    return rank % ulysses_degree, rank // ulysses_degree % ring_degree, rank // (ulysses_degree * ring_degree)


def mesh_rank(ulysses_rank, ring_rank, dp_rank, ulysses_degree, ring_degree):
    """Global rank of mesh coordinates: ``dp_rank * (r * u) + ring_rank * u + ulysses_rank``."""
    return dp_rank * (ring_degree * ulysses_degree) + ring_rank * ulysses_degree + ulysses_rank


def _check_degree(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")


def check_degrees(ulysses_degree, ring_degree, data_parallel, world_size):
    """The data-parallel degree of a valid configuration; ValueError naming the numbers otherwise.
    Pure arithmetic: no process group needed (usable before ``init_process_group``)."""
    _check_degree("ulysses_degree", ulysses_degree)
    _check_degree("ring_degree", ring_degree)
    if data_parallel is not None:
        _check_degree("data_parallel", data_parallel)
    sp = ulysses_degree * ring_degree
    if data_parallel is None:
        if world_size % sp:
            raise ValueError(f"ulysses_degree x ring_degree ({ulysses_degree} x {ring_degree} = {sp}) must divide "
                             f"the world size ({world_size})")
        return world_size // sp
    if sp * data_parallel != world_size:
        raise ValueError(f"ulysses_degree x ring_degree x data_parallel ({ulysses_degree} x {ring_degree} x "
                         f"{data_parallel} = {sp * data_parallel}) must equal the world size ({world_size})")
    return data_parallel


@dataclasses.dataclass(frozen=True)
class SequenceParallelGroups:
    """This rank's process groups and coordinates in the (dp, ring, ulysses) mesh. Every group is a real
    process group, also when its degree is 1 (a group of this rank alone)."""

    ulysses_group: Any
    """The u adjacent ranks that exchange heads for sequence (Ulysses all-to-all); pass it as
    ``ulysses_group`` to ``usp_attention`` or as the sequence group of DeepSpeed's ``DistributedAttention``."""
    ring_group: Any
    """The r ranks, u apart, whose K/V blocks travel around one ring (``ring_attention``'s ``group``)."""
    sp_group: Any
    """The u*r ranks that hold one sequence together (one model replica's sequence-parallel group)."""
    dp_group: Any
    """The dp ranks with the same (ulysses_rank, ring_rank) in every replica: they hold the same
    positions of different sequences."""
    sp_dp_group: Any
    """All u*r*dp ranks, which hold replicas of the same parameters: ZeRO partitions optimizer state
    and reduces gradients over it (DeepSpeed's "sequence data parallel" group)."""
    self_group: Any
    """This rank alone: DeepSpeed's model- (tensor-, pipeline-) parallel group, since the model is not
    split (collectives over it are no-ops)."""
    ulysses_rank: int
    """Rank in ulysses_group (= rank % u): which contiguous piece of its ring shard this rank holds."""
    ulysses_size: int
    """Ulysses degree u (the size of ulysses_group)."""
    ring_rank: int
    """Rank in ring_group (= rank // u % r): which ring shard (``dist_attn.shard``) this rank's piece is of."""
    ring_size: int
    """Ring degree r (the size of ring_group)."""
    dp_rank: int
    """Rank in dp_group (= rank // (u * r)): which replica this rank belongs to."""
    dp_size: int
    """Data-parallel degree: the number of replicas (the size of dp_group)."""

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


def sequence_parallel_groups(ulysses_degree, ring_degree, data_parallel=None) -> SequenceParallelGroups:
    """Creates the Ulysses, ring, SP, DP, SP x DP and single-rank groups of a ``u x r x dp`` mesh and
    returns this rank's (a collective: every rank of the default group calls it with the same arguments).

    ``data_parallel=None`` takes ``world_size / (u * r)``. Raises ValueError, before creating any group,
    when a degree is not an int >= 1 or ``u * r * dp`` is not the world size; RuntimeError when
    torch.distributed is not initialised.
    """
    for name, value in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree)):
        _check_degree(name, value)
    if data_parallel is not None:
        _check_degree("data_parallel", data_parallel)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("sequence_parallel_groups needs an initialised default process group "
                           "(torch.distributed.init_process_group)")
    world_size, rank = dist.get_world_size(), dist.get_rank()
    dp = check_degrees(ulysses_degree, ring_degree, data_parallel, world_size)
    u, r = ulysses_degree, ring_degree
    my_u, my_r, my_dp = mesh_coordinates(rank, u, r)

    def at(ur, rr, dr):
        return mesh_rank(ur, rr, dr, u, r)

    # Every rank creates every group, in this fixed order; each keeps the ones it belongs to.
    layouts = {
        "ulysses_group": [[at(ur, rr, dr) for ur in range(u)] for dr in range(dp) for rr in range(r)],
        "ring_group": [[at(ur, rr, dr) for rr in range(r)] for dr in range(dp) for ur in range(u)],
        "sp_group": [[at(ur, rr, dr) for rr in range(r) for ur in range(u)] for dr in range(dp)],
        "dp_group": [[at(ur, rr, dr) for dr in range(dp)] for rr in range(r) for ur in range(u)],
        "sp_dp_group": [list(range(world_size))],
        "self_group": [[i] for i in range(world_size)],
    }
    mine = {}
    for name, rank_lists in layouts.items():
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[name] = group
    return SequenceParallelGroups(**mine, ulysses_rank=my_u, ulysses_size=u, ring_rank=my_r, ring_size=r,
                                  dp_rank=my_dp, dp_size=dp)


class DeepSpeedMPU:
    """DeepSpeed's "model parallel unit" for Ulysses x ring x data parallelism (no tensor or pipeline
    parallelism). Pass it as ``deepspeed.initialize(..., mpu=groups.mpu)``.

    What DeepSpeed does with it (deepspeed.utils.groups, runtime/engine.py, runtime/zero/stage_1_and_2.py):

    - ``get_sequence_data_parallel_group``: ZeRO partitions optimizer state (and gradients, stage 2) over
      it and reduces gradients over it; the engine broadcasts the initial parameters over it.
    - ``get_sequence_parallel_world_size``: gradients summed over the SP x DP group are divided by
      ``sp_dp_size / sp_size = dp``: summed over SP, averaged over replicas.
    - ``get_data_parallel_world_size``: the number of replicas, for the batch-size arithmetic
      (``train_batch_size = micro_batch * grad_accum * dp``) and data samplers.
    - ``get_model_parallel_*`` / ``get_tensor_model_parallel_*`` / pipeline: this rank alone.

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

    # Sequence x data parallelism: every rank holding a replica of the parameters.
    def get_sequence_data_parallel_group(self):
        return self.groups.sp_dp_group

    def get_sequence_data_parallel_world_size(self):
        return self.groups.sp_size * self.groups.dp_size

    def get_sequence_data_parallel_rank(self):
        return dist.get_rank(self.groups.sp_dp_group)

    # Data parallelism: one rank per replica (the ranks at the same sequence position).
    def get_data_parallel_group(self):
        return self.groups.dp_group

    def get_data_parallel_world_size(self):
        return self.groups.dp_size

    def get_data_parallel_rank(self):
        return self.groups.dp_rank

    def get_data_parallel_group_ranks(self):
        g = self.groups
        return [mesh_rank(g.ulysses_rank, g.ring_rank, d, g.ulysses_size, g.ring_size) for d in range(g.dp_size)]

    # Model (tensor, pipeline) parallelism: none, this rank alone.
    def get_model_parallel_group(self):
        return self.groups.self_group

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_rank()

    get_pipeline_model_parallel_group = get_model_parallel_group
    get_pipeline_model_parallel_world_size = get_model_parallel_world_size
    get_pipeline_model_parallel_rank = get_model_parallel_rank

    # The two axes of the sequence group, for users of this object.
    def get_ulysses_group(self):
        return self.groups.ulysses_group

    def get_ring_group(self):
        return self.groups.ring_group

    def __repr__(self):
        g = self.groups
        return (f"DeepSpeedMPU(ulysses {g.ulysses_rank}/{g.ulysses_size}, ring {g.ring_rank}/{g.ring_size}, "
                f"dp {g.dp_rank}/{g.dp_size})")
