"""Which ranks share a node: the structure the hierarchical ring follows.

On real clusters the links inside a node (NVLink, ~450 GB/s per direction) are about ten times faster
than the links between nodes (InfiniBand, ~50 GB/s per GPU). A flat ring makes every step wait on its
slowest hop; the hierarchical ring (BurstAttention's double ring) circulates K/V on the fast ring of each
node and moves each block to the next node only once per g steps, overlapped with them (``dist_attn.ring``).

Node structure, first match wins:

1. ``local_world_size`` passed to ``detect`` or the ``DIST_ATTN_LOCAL_WORLD_SIZE`` environment variable:
   consecutive blocks of that many group ranks form a node (torchrun numbers ranks node by node). This is
   also how tests emulate several nodes on one machine.
2. Host names: one ``all_gather_object`` of ``socket.gethostname()`` over the group, cached per group;
   ranks with the same host name form a node.
"""

from __future__ import annotations

import os
import socket
from typing import NamedTuple

import torch.distributed as dist

ENV_LOCAL_WORLD_SIZE = "DIST_ATTN_LOCAL_WORLD_SIZE"
TOPOLOGIES = ("auto", "flat", "hierarchical")
_HOSTNAME_CACHE = {}  # group -> Topology from host names


class Topology(NamedTuple):
    """``nodes[n]``: the group ranks of node n, in ring order; every node has the same size."""
    nodes: tuple

    @property
    def node_count(self):
        return len(self.nodes)

    @property
    def local_size(self):
        return len(self.nodes[0])

    def locate(self, rank):
        """(node, local index) of a group rank."""
        for node, members in enumerate(self.nodes):
            if rank in members:
                return node, members.index(rank)
        raise ValueError(f"rank {rank} is not in the topology {self.nodes}")

    def rank_at(self, node, local):
        return self.nodes[node % self.node_count][local % self.local_size]


def check_topology(topology):
    if topology not in TOPOLOGIES:
        raise ValueError(f"topology must be one of {TOPOLOGIES}; got {topology!r}")


def _from_local_size(world_size, local_size, source):
    if isinstance(local_size, bool) or not isinstance(local_size, int) or local_size < 1:
        raise ValueError(f"{source} must be an int >= 1; got {local_size!r}")
    if world_size % local_size:
        raise ValueError(f"{source} ({local_size}) must divide the group's world size ({world_size})")
    return Topology(tuple(tuple(range(start, start + local_size)) for start in range(0, world_size, local_size)))


def detect(group=None, local_world_size=None):
    """The node structure of ``group`` (see the module docstring). Raises ValueError when host names give
    nodes of different sizes: the hierarchical ring needs equal ones."""
    world_size = dist.get_world_size(group) if dist.is_initialized() else 1
    if local_world_size is not None:
        return _from_local_size(world_size, local_world_size, "local_world_size")
    env = os.environ.get(ENV_LOCAL_WORLD_SIZE)
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(f"{ENV_LOCAL_WORLD_SIZE} must be an int >= 1; got {env!r}") from None
        return _from_local_size(world_size, value, ENV_LOCAL_WORLD_SIZE)
    if world_size == 1:
        return Topology(((0,),))
    if group not in _HOSTNAME_CACHE:
        hosts = [None] * world_size
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        nodes = {}
        for rank, host in enumerate(hosts):
            nodes.setdefault(host, []).append(rank)
        sizes = sorted({len(members) for members in nodes.values()})
        if len(sizes) > 1:
            raise ValueError(f"nodes of the group have different numbers of ranks ({ {h: len(m) for h, m in nodes.items()} }); "
                             f"the hierarchical ring needs equal ones: use topology='flat' or set {ENV_LOCAL_WORLD_SIZE}")
        _HOSTNAME_CACHE[group] = Topology(tuple(tuple(members) for members in nodes.values()))
    return _HOSTNAME_CACHE[group]


def resolve(topology, group, full_ring):
    """The ``Topology`` the ring runs on, or None for the flat ring.

    "flat": None. "hierarchical": the detected nodes (a single node, or one rank per node, is the flat
    ring). "auto": hierarchical when there are several nodes of several ranks and the ring sends every
    block (``full_ring``; a sliding window that needs only nearby blocks is cheaper on the flat plan).
    """
    check_topology(topology)
    if topology == "flat":
        return None
    nodes = detect(group)
    if nodes.node_count == 1 or nodes.local_size == 1:
        return None
    if topology == "auto" and not full_ring:
        return None
    return nodes
