"""dist_attn.groups: the Ulysses x ring x data-parallel mesh over real gloo worlds of 4 and 8 ranks.

Each world is spawned once (launch/spawn.py) and builds the groups of every configuration in turn; the
test process checks every group's members and every coordinate against the rank formula
``rank = dp_rank * (r * u) + ring_rank * u + ulysses_rank``. Bad configurations raise ValueError before
any collective: rank 0 alone tries them (its peers do not take part) and must fail fast, having
created no group.
"""

from __future__ import annotations

import functools
import time

import pytest
import torch
import torch.distributed as dist

from dist_attn.groups import check_degrees, mesh_coordinates, mesh_rank, sequence_parallel_groups
from launch.spawn import WorldFailed, run_world

CONFIGS = {4: [(1, 4, None), (2, 2, None), (4, 1, None), (2, 1, 2), (1, 1, 4)], 8: [(2, 2, 2), (2, 2, None)]}
BAD = [  # in the world of 4: (ulysses, ring, data_parallel), words the message must contain
    ((3, 1, None), ["3", "world size (4)"]),
    ((2, 2, 2), ["2 x 2 x 2 = 8", "world size (4)"]),
    ((0, 4, None), ["ulysses_degree", "0"]),
    ((2, 0, None), ["ring_degree", "0"]),
    ((2.0, 2, None), ["ulysses_degree", "2.0"]),
    ((2, "2", None), ["ring_degree", "'2'"]),
    ((True, 4, None), ["ulysses_degree", "True"]),
    ((2, 2, 0), ["data_parallel", "0"]),
    ((1, 1, 3), ["1 x 1 x 3 = 3", "world size (4)"]),
]
GROUPS = ("ulysses_group", "ring_group", "sp_group", "dp_group", "sp_dp_group", "self_group")


def group_count():
    return dist.distributed_c10d._world.group_count


def try_bad_configs(rank, world_size):
    """Rank 0 alone calls sequence_parallel_groups with every bad configuration: (message or None, seconds,
    groups created)."""
    if rank != 0 or world_size != 4:
        return None
    results = []
    for args, _ in BAD:
        before, start = group_count(), time.monotonic()
        try:
            sequence_parallel_groups(*args)
            message = None
        except ValueError as error:
            message = str(error)
        results.append((message, time.monotonic() - start, group_count() - before))
    return results


def describe(groups):
    """Everything a rank can say about its groups (ranks of each, coordinates, what the mpu reports)."""
    mpu = groups.mpu
    return {
        "members": {name: dist.get_process_group_ranks(getattr(groups, name)) for name in GROUPS},
        "group_ranks": {name: dist.get_rank(getattr(groups, name)) for name in GROUPS},
        "coords": (groups.ulysses_rank, groups.ulysses_size, groups.ring_rank, groups.ring_size, groups.dp_rank,
                   groups.dp_size, groups.sp_rank, groups.sp_size),
        "mpu": {
            "sp": (dist.get_process_group_ranks(mpu.get_sequence_parallel_group()),
                   mpu.get_sequence_parallel_world_size(), mpu.get_sequence_parallel_rank()),
            "sp_dp": (dist.get_process_group_ranks(mpu.get_sequence_data_parallel_group()),
                      mpu.get_sequence_data_parallel_world_size(), mpu.get_sequence_data_parallel_rank()),
            "dp": (dist.get_process_group_ranks(mpu.get_data_parallel_group()), mpu.get_data_parallel_world_size(),
                   mpu.get_data_parallel_rank(), list(mpu.get_data_parallel_group_ranks())),
            "mp": (dist.get_process_group_ranks(mpu.get_model_parallel_group()), mpu.get_model_parallel_world_size(),
                   mpu.get_model_parallel_rank(), mpu.get_tensor_model_parallel_world_size(),
                   mpu.get_tensor_model_parallel_rank(), mpu.get_pipeline_model_parallel_world_size()),
        },
    }


def build_all(rank, world_size, configs):
    bad = try_bad_configs(rank, world_size)
    dist.barrier()  # the peers wait here while rank 0 tries the bad configurations
    built = {}
    for config in configs:
        groups = sequence_parallel_groups(*config)
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
        return run_world(world_size, build_all, CONFIGS[world_size], timeout=120, pg_timeout_s=20), None
    except WorldFailed as failure:
        return None, failure


def world(world_size):
    results, failure = world_outcome(world_size)
    if failure is not None:
        raise failure
    return results


def expected(rank, world_size, u, r, dp):
    """The members of each of ``rank``'s groups, from the rank formula."""
    dp = dp or world_size // (u * r)
    ur, rr, dr = rank % u, rank // u % r, rank // (u * r)
    at = functools.partial(mesh_rank, ulysses_degree=u, ring_degree=r)
    return {
        "ulysses_group": [at(i, rr, dr) for i in range(u)],
        "ring_group": [at(ur, i, dr) for i in range(r)],
        "sp_group": [at(i, j, dr) for j in range(r) for i in range(u)],
        "dp_group": [at(ur, rr, i) for i in range(dp)],
        "sp_dp_group": list(range(world_size)),
        "self_group": [rank],
    }, (ur, u, rr, r, dr, dp, rr * u + ur, u * r)


CASES = [(w, config) for w, configs in CONFIGS.items() for config in configs]


@pytest.mark.parametrize("world_size,config", CASES, ids=[f"w{w}-u{c[0]}-r{c[1]}-dp{c[2]}" for w, c in CASES])
def test_membership_and_coordinates(world_size, config):
    u, r, dp = config
    for rank, result in enumerate(world(world_size)):
        got = result["built"][config]
        members, coords = expected(rank, world_size, u, r, dp)
        assert got["members"] == members, (rank, got["members"], members)
        assert got["coords"] == coords, (rank, got["coords"], coords)
        assert got["sums"] == {name: len(ranks) for name, ranks in members.items()}, (rank, got["sums"])
        assert mesh_coordinates(rank, u, r) == coords[0:5:2]
        # a rank's position in each group is its coordinate on that axis
        ranks_in = got["group_ranks"]
        assert (ranks_in["ulysses_group"], ranks_in["ring_group"], ranks_in["dp_group"]) == coords[0:5:2]
        assert ranks_in["sp_group"] == coords[6] and ranks_in["sp_dp_group"] == rank and ranks_in["self_group"] == 0


@pytest.mark.parametrize("world_size,config", CASES, ids=[f"w{w}-u{c[0]}-r{c[1]}-dp{c[2]}" for w, c in CASES])
def test_deepspeed_mpu(world_size, config):
    """What DeepSpeed reads: SP = the u*r ranks of a sequence, SP x DP = all ranks, DP = the replicas,
    model parallel = this rank alone."""
    u, r, dp = config
    for rank, result in enumerate(world(world_size)):
        mpu = result["built"][config]["mpu"]
        members, (ur, _, rr, _, dr, dp_size, sp_rank, sp_size) = expected(rank, world_size, u, r, dp)
        assert mpu["sp"] == (members["sp_group"], sp_size, sp_rank)
        assert mpu["sp_dp"] == (list(range(world_size)), world_size, rank)
        assert mpu["dp"] == (members["dp_group"], dp_size, dr, members["dp_group"])
        assert mpu["mp"] == ([rank], 1, 0, 1, 0, 1)
        # DeepSpeed divides the SP x DP gradient sum by sp_dp_size / sp_size: the number of replicas
        assert mpu["sp_dp"][1] / mpu["sp"][1] == dp_size


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
    with pytest.raises(ValueError, match=r"2 x 3 = 6\) must divide the world size \(8\)"):
        check_degrees(2, 3, None, 8)


def test_uninitialised_torch_distributed_is_an_error():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        sequence_parallel_groups(1, 1)
    with pytest.raises(ValueError, match="ring_degree"):  # degrees are checked first
        sequence_parallel_groups(1, -1)
