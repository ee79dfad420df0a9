"""The hierarchical (topology-aware) ring: exact against float64, forward and backward, with several
"nodes" emulated on one machine by ``DIST_ATTN_LOCAL_WORLD_SIZE``; only n - 1 of a rank's w - 1 block
transfers cross a node boundary; node detection and its errors."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from attention_checks import max_error, reference_with_grads
from dist_attn.topology import ENV_LOCAL_WORLD_SIZE, Topology, detect, resolve
from launch.spawn import WorldFailed, run_world

FWD_TOL, GRAD_TOL = 2e-5, 1e-4
SHAPES = {8: 4, 6: 2, 4: 2}  # world size -> ranks per node: 2 x 4, 3 x 2, 2 x 2


def cases():
    result = [dict(layout=layout, causal=causal, window=None, packed=False)
              for layout in ("contiguous", "zigzag", "striped") for causal in (True, False)]
    result.append(dict(layout="zigzag", causal=True, window=None, packed=True))
    result.append(dict(layout="zigzag", causal=True, window=(40, 0), packed=False))  # forced: full ring sent
    return result


def case_id(case):
    return "-".join(str(v).replace(" ", "") for v in case.values())


def run_case(rank, world_size, case, topology):
    from dist_attn import gather, ring_attention, shard
    from dist_attn.comm import RingComm

    layout = case["layout"]
    gen = torch.Generator().manual_seed(world_size)
    if case["packed"]:
        lengths = (3, 50, 17 * world_size + 5)
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        shape, sharding = (sum(lengths),), dict(cu_seqlens=cu)
    else:
        shape, sharding = (1, 12 * world_size), {}
    q = torch.randn(*shape, 4, 8, generator=gen)
    k, v = (torch.randn(*shape, 2, 8, generator=gen) for _ in range(2))
    dout = torch.randn(q.shape, generator=gen)
    local = [shard(x, layout, rank, world_size, **sharding).requires_grad_() for x in (q, k, v)]

    peers = []  # the peer of every message this rank sends
    real_send_recv = RingComm.send_recv

    def recording(self, send, recv=None, distance=1):
        peers.append(self.peer(distance))
        return real_send_recv(self, send, recv, distance)

    RingComm.send_recv = recording
    try:
        out = ring_attention(*local, causal=case["causal"], layout=layout, window=case["window"],
                             topology=topology, **sharding)
        forward_peers = list(peers)
        out.backward(shard(dout, layout, rank, world_size, **sharding))
    finally:
        RingComm.send_recv = real_send_recv
    results = [gather(t.detach(), layout, **sharding) for t in (out, *(x.grad for x in local))]
    node_of = {r: r // SHAPES[world_size] for r in range(world_size)}
    crossing = sum(node_of[p] != node_of[rank] for p in forward_peers)
    summary = {"messages": len(forward_peers), "crossing": crossing}
    if rank != 0:
        return summary
    if case["packed"]:
        bounds = cu.tolist()
        reference = [torch.cat(parts) for parts in zip(*(
            (o[0], g_q[0], g_k[0], g_v[0]) for o, _, g_q, g_k, g_v in (
                reference_with_grads(q[None, a:b], k[None, a:b], v[None, a:b], dout[None, a:b], case["causal"],
                                     case["window"]) for a, b in zip(bounds, bounds[1:]))))]
    else:
        o, _, g_q, g_k, g_v = reference_with_grads(q, k, v, dout, case["causal"], case["window"])
        reference = [o, g_q, g_k, g_v]
    errors = {name: max_error(got, ref) for name, got, ref in zip(("out", "dq", "dk", "dv"), results, reference)}
    return {**summary, "errors": errors}


def run_all(rank, world_size, topology):
    os.environ[ENV_LOCAL_WORLD_SIZE] = str(SHAPES[world_size])
    return {case_id(case): run_case(rank, world_size, case, topology) for case in cases()}


@functools.lru_cache(maxsize=None)
def world_results(world_size, topology):
    return run_world(world_size, run_all, topology, timeout=600)


ALL = [(w, case) for w in SHAPES for case in cases()]


@pytest.mark.parametrize("world_size,case", ALL, ids=[f"w{w}-{case_id(c)}" for w, c in ALL])
def test_hierarchical_ring_is_exact(world_size, case):
    per_rank = [result[case_id(case)] for result in world_results(world_size, "hierarchical")]
    errors = per_rank[0]["errors"]
    assert errors["out"] <= FWD_TOL and max(errors["dq"], errors["dk"], errors["dv"]) <= GRAD_TOL, errors
    nodes = world_size // SHAPES[world_size]
    for summary in per_rank:  # w - 1 blocks reach each rank; only n - 1 of them come from another node
        assert summary["messages"] == world_size - 1 and summary["crossing"] == nodes - 1, summary


def test_flat_ring_crosses_nodes_at_every_node_boundary():
    """The control: on the flat ring, the last rank of each node sends all its w - 1 messages across."""
    per_rank = [result[case_id(cases()[0])] for result in world_results(8, "flat")]
    assert per_rank[0]["errors"]["out"] <= FWD_TOL
    assert [s["crossing"] for s in per_rank] == [0, 0, 0, 7, 0, 0, 0, 7]


def test_resolve_and_detect(monkeypatch):
    monkeypatch.setenv(ENV_LOCAL_WORLD_SIZE, "1")
    assert detect() == Topology(((0,),))
    assert resolve("hierarchical", None, True) is None  # one rank: the flat ring
    with pytest.raises(ValueError, match=r"topology must be one of \('auto', 'flat', 'hierarchical'\); got 'ring'"):
        resolve("ring", None, True)
    monkeypatch.setenv(ENV_LOCAL_WORLD_SIZE, "two")
    with pytest.raises(ValueError, match=r"DIST_ATTN_LOCAL_WORLD_SIZE must be an int >= 1; got 'two'"):
        detect()
    with pytest.raises(ValueError, match=r"local_world_size must be an int >= 1; got 0"):
        detect(local_world_size=0)
    nodes = Topology(((0, 1, 2), (3, 4, 5)))
    assert nodes.locate(4) == (1, 1) and nodes.rank_at(-1, 4) == 4 and nodes.local_size == 3


def uneven_local_size(rank, world_size):
    os.environ[ENV_LOCAL_WORLD_SIZE] = "4"
    return detect()


def test_local_size_must_divide_the_world():
    with pytest.raises(WorldFailed, match=r"DIST_ATTN_LOCAL_WORLD_SIZE \(4\) must divide the group's world size \(6\)"):
        run_world(6, uneven_local_size, timeout=120)


def detect_by_hostname(rank, world_size):
    os.environ.pop(ENV_LOCAL_WORLD_SIZE, None)
    from dist_attn.topology import resolve as resolve_in_rank

    return detect(), resolve_in_rank("auto", None, True)


def test_hostnames_put_one_machine_in_one_node():
    topology, resolved = run_world(3, detect_by_hostname, timeout=120)[0]
    assert topology == Topology(((0, 1, 2),)) and resolved is None  # one node: auto is the flat ring


def disagreeing_local_size(rank, world_size):
    from dist_attn import ring_attention

    os.environ[ENV_LOCAL_WORLD_SIZE] = "2" if rank == 0 else "4"
    x = torch.randn(1, 8, 2, 8)
    ring_attention(x, x, x, topology="hierarchical")


def test_ranks_that_see_different_nodes_all_raise():
    with pytest.raises(WorldFailed, match=r"'DIST_ATTN_LOCAL_WORLD_SIZE': \[2, 4, 4, 4\]"):
        run_world(4, disagreeing_local_size, timeout=120)
