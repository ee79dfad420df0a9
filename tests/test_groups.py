"""dist_attn.groups: the pipe x data x ring x Ulysses x tensor mesh over real gloo worlds of 4 and 8 ranks.

Each world is spawned once (launch/spawn.py) and builds the groups of every configuration in turn; the
test process checks every group's members and every coordinate against the rank formula
``rank = (((pipe * dp + data) * r + ring) * u + ulysses) * t + tensor``, written out independently here, and
DeepSpeed's ``ProcessTopology`` of the mesh against the same formula. Bad configurations raise ValueError
before any collective: rank 0 alone tries them (its peers do not take part) and must fail fast, having
created no group. Every group gets the default group's timeout.
"""

from __future__ import annotations

import functools
import itertools
import time

import pytest
import torch
import torch.distributed as dist

from dist_attn.comm import group_timeout_s
from dist_attn.groups import Coordinates, check_degrees, mesh_coordinates, mesh_rank, sequence_parallel_groups
from launch.spawn import WorldFailed, run_world

PG_TIMEOUT_S = 20
# (ulysses, ring, data_parallel, pipeline, tensor)
CONFIGS = {4: [(1, 4, None, 1, 1), (2, 2, None, 1, 1), (4, 1, None, 1, 1), (2, 1, 2, 1, 1), (1, 1, 4, 1, 1),
               (1, 2, None, 2, 1), (1, 1, None, 2, 2), (2, 1, None, 1, 2), (1, 1, None, 4, 1)],
           8: [(2, 2, 2, 1, 1), (2, 2, None, 1, 1), (1, 2, None, 2, 2), (2, 1, 2, 2, 1)]}
BAD = [  # in the world of 4: (ulysses, ring, data_parallel, pipeline, tensor), words the message must contain
    ((3, 1, None, 1, 1), ["3", "world size (4)"]),
    ((2, 2, 2, 1, 1), ["2 x 2 x 2 = 8", "world size (4)"]),
    ((0, 4, None, 1, 1), ["ulysses_degree", "0"]),
    ((2, 0, None, 1, 1), ["ring_degree", "0"]),
    ((2.0, 2, None, 1, 1), ["ulysses_degree", "2.0"]),
    ((2, "2", None, 1, 1), ["ring_degree", "'2'"]),
    ((True, 4, None, 1, 1), ["ulysses_degree", "True"]),
    ((2, 2, 0, 1, 1), ["data_parallel", "0"]),
    ((1, 1, 3, 1, 1), ["1 x 1 x 3 = 3", "world size (4)"]),
    ((1, 2, None, 0, 1), ["pipeline", "0"]),
    ((1, 2, None, 1, 1.0), ["tensor", "1.0"]),
    ((1, 2, None, 2, 2), ["pipeline x tensor", "1 x 2 x 2 x 2 = 8", "world size (4)"]),
    ((1, 1, 2, 3, 1), ["pipeline x data_parallel", "1 x 1 x 3 x 2 = 6"]),
]
GROUPS = ("ulysses_group", "ring_group", "sp_group", "dp_group", "sp_dp_group", "pipe_group", "tensor_group",
          "model_parallel_group")


def group_count():
    return dist.distributed_c10d._world.group_count


def call(config):
    u, r, dp, p, t = config
    return sequence_parallel_groups(u, r, dp, pipeline=p, tensor=t)


def try_bad_configs(rank, world_size):
    """Rank 0 alone calls sequence_parallel_groups with every bad configuration: (message or None, seconds,
    groups created)."""
    if rank != 0 or world_size != 4:
        return None
    results = []
    for config, _ in BAD:
        before, start = group_count(), time.monotonic()
        try:
            call(config)
            message = None
        except ValueError as error:
            message = str(error)
        results.append((message, time.monotonic() - start, group_count() - before))
    return results


def describe(groups):
    """Everything a rank can say about its groups (ranks of each, coordinates, what the mpu reports)."""
    mpu = groups.mpu
    topology = groups.topology()
    return {
        "members": {name: dist.get_process_group_ranks(getattr(groups, name)) for name in GROUPS},
        "group_ranks": {name: dist.get_rank(getattr(groups, name)) for name in GROUPS},
        "timeouts": {name: group_timeout_s(getattr(groups, name)) for name in GROUPS},
        "coords": tuple(groups.coords),
        "sizes": (groups.pipe_size, groups.dp_size, groups.ring_size, groups.ulysses_size, groups.tensor_size),
        "sp": (groups.sp_rank, groups.sp_size),
        "topology": [tuple(topology.get_coord(rank)) for rank in range(dist.get_world_size())],
        "mpu": {
            "sp": (dist.get_process_group_ranks(mpu.get_sequence_parallel_group()),
                   mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()),
            "sp_dp": (dist.get_process_group_ranks(mpu.get_sequence_data_parallel_group()),
                      mpu.get_sequence_data_parallel_world_size(), mpu.get_sequence_data_parallel_rank()),
            "dp": (dist.get_process_group_ranks(mpu.get_data_parallel_group()), mpu.get_data_parallel_world_size(),
                   mpu.get_data_parallel_rank(), list(mpu.get_data_parallel_group_ranks())),
            "mp": (dist.get_process_group_ranks(mpu.get_model_parallel_group()), mpu.get_model_parallel_world_size(),
                   mpu.get_model_parallel_rank()),
            "tp": (dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group()),
                   mpu.get_tensor_model_parallel_world_size(), mpu.get_tensor_model_parallel_rank(),
                   mpu.get_tensor_model_parallel_src_rank()),
            "pp": (dist.get_process_group_ranks(mpu.get_pipe_parallel_group()), mpu.get_pipe_parallel_world_size(),
                   mpu.get_pipe_parallel_rank()),
        },
    }


def build_all(rank, world_size, configs):
    bad = try_bad_configs(rank, world_size)
    dist.barrier()  # the peers wait here while rank 0 tries the bad configurations
    built = {}
    for config in configs:
        groups = call(config)
        built[config] = describe(groups)
        # the groups work: a sum over each of them counts its members
        for name in GROUPS:
            one = torch.ones(1)
            dist.all_reduce(one, group=getattr(groups, name))
            built[config].setdefault("sums", {})[name] = int(one.item())
    return {"bad": bad, "built": built, "group_count": group_count()}


@functools.lru_cache(maxsize=None)
def world_outcome(world_size):
    """(per-rank results, None) or (None, the failure): a failed world is spawned once, not once per test."""
    try:
        return run_world(world_size, build_all, CONFIGS[world_size], timeout=120, pg_timeout_s=PG_TIMEOUT_S), None
    except WorldFailed as failure:
        return None, failure


def world(world_size):
    results, failure = world_outcome(world_size)
    if failure is not None:
        raise failure
    return results


def rank_of(p, d, rr, ur, tr, sizes):
    """The rank formula, written out: pipe slowest, then data, ring, Ulysses, tensor fastest."""
    _, dp, r, u, t = sizes
    return (((p * dp + d) * r + rr) * u + ur) * t + tr


def expected(rank, world_size, config):
    """(members of each of ``rank``'s groups, its coordinates, the axis sizes), by brute force over the mesh."""
    u, r, dp, p, t = config
    sizes = (p, dp or world_size // (u * r * p * t), r, u, t)
    coords = next(c for c in itertools.product(*map(range, sizes)) if rank_of(*c, sizes) == rank)
    varying = {"ulysses_group": {3}, "ring_group": {2}, "sp_group": {2, 3}, "dp_group": {1}, "sp_dp_group": {1, 2, 3},
               "pipe_group": {0}, "tensor_group": {4}, "model_parallel_group": {0, 4}}
    members = {name: sorted(rank_of(*c, sizes) for c in itertools.product(*map(range, sizes))
                            if all(c[i] == coords[i] for i in range(5) if i not in axes))
               for name, axes in varying.items()}
    return members, coords, sizes


CASES = [(w, config) for w, configs in CONFIGS.items() for config in configs]
IDS = [f"w{w}-u{c[0]}-r{c[1]}-dp{c[2]}-p{c[3]}-t{c[4]}" for w, c in CASES]


@pytest.mark.parametrize("world_size,config", CASES, ids=IDS)
def test_membership_and_coordinates(world_size, config):
    for rank, result in enumerate(world(world_size)):
        got = result["built"][config]
        members, coords, sizes = expected(rank, world_size, config)
        assert got["members"] == members, (rank, got["members"], members)
        assert got["coords"] == coords and got["sizes"] == sizes, (rank, got["coords"], coords)
        assert got["sums"] == {name: len(ranks) for name, ranks in members.items()}, (rank, got["sums"])
        assert got["timeouts"] == dict.fromkeys(GROUPS, PG_TIMEOUT_S), got["timeouts"]  # not gloo's 30 minutes
        assert mesh_coordinates(rank, Coordinates(*sizes)) == coords
        assert mesh_rank(Coordinates(*coords), Coordinates(*sizes)) == rank
        # a rank's position in each group is its index among the members (ascending ranks)
        assert got["group_ranks"] == {name: ranks.index(rank) for name, ranks in members.items()}
        p, d, rr, ur, tr = coords
        assert got["sp"] == (rr * sizes[3] + ur, sizes[2] * sizes[3])
        # DeepSpeed's ProcessTopology puts every rank at the same coordinates
        assert got["topology"] == [expected(i, world_size, config)[1] for i in range(world_size)]


@pytest.mark.parametrize("world_size,config", CASES, ids=IDS)
def test_deepspeed_mpu(world_size, config):
    """What DeepSpeed reads: SP = the u*r ranks of a sequence, SP x DP = a stage's replicas of the same
    parameters, DP = the replicas, model parallel = pipe x tensor (the gradient norm's second sum)."""
    for rank, result in enumerate(world(world_size)):
        mpu = result["built"][config]["mpu"]
        members, (p, d, rr, ur, tr), (_, dp, r, u, t) = expected(rank, world_size, config)
        assert mpu["sp"] == (members["sp_group"], u * r, rr * u + ur)
        assert mpu["sp_dp"] == (members["sp_dp_group"], u * r * dp, members["sp_dp_group"].index(rank))
        assert mpu["dp"] == (members["dp_group"], dp, d, members["dp_group"])
        assert mpu["mp"] == (members["model_parallel_group"], len(members["model_parallel_group"]), p * t + tr)
        assert mpu["tp"] == (members["tensor_group"], t, tr, members["tensor_group"][0])
        assert mpu["pp"] == (members["pipe_group"], len(members["pipe_group"]), p)
        # DeepSpeed divides the SP x DP gradient sum by sp_dp_size / sp_size: the number of replicas
        assert mpu["sp_dp"][1] / mpu["sp"][1] == dp


def test_groups_are_created_in_the_same_order_everywhere():
    for world_size in CONFIGS:
        counts = {result["group_count"] for result in world(world_size)}
        assert len(counts) == 1, counts


@pytest.mark.parametrize("index", range(len(BAD)), ids=[str(args) for args, _ in BAD])
def test_bad_configs_raise_before_any_collective(index):
    message, seconds, created = world(4)[0]["bad"][index]
    assert message is not None, f"{BAD[index][0]} did not raise"
    for word in BAD[index][1]:
        assert word in message, (word, message)
    assert created == 0, f"{created} groups were created before the error"
    assert seconds < 5, f"took {seconds:.1f}s: waited for peers"


def test_check_degrees_needs_no_process_group():
    assert check_degrees(2, 2, None, 8) == 2
    assert check_degrees(1, 4, 1, 4) == 1
    assert check_degrees(1, 2, None, 16, pipeline=2, tensor=2) == 2
    with pytest.raises(ValueError, match=r"2 x 3 = 6\) must divide the world size \(8\)"):
        check_degrees(2, 3, None, 8)


def test_uninitialised_torch_distributed_is_an_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_groups(1, 1)
    with pytest.raises(ValueError, match="ring_degree"):  # degrees are checked first
        sequence_parallel_groups(1, -1)
