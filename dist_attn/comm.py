"""The ring: who sends to whom, and one double-buffered transfer in flight.

Each step a rank sends the block it holds to the next rank and receives the previous rank's block
(or, for the reverse ring and the return of accumulators, to and from ranks further away).
``send_recv`` only *starts* the transfer (``torch.distributed.batch_isend_irecv``); the caller computes
on the block it holds and calls ``wait`` when it needs the received one, so step s+1's transfer
overlaps step s's compute. NCCL for CUDA tensors, gloo for CPU tensors (whatever backend the group has).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_meters = []  # open traffic_meter() lists


@contextlib.contextmanager
def traffic_meter():
    """Records the size in bytes of every message this process sends (ring steps, Ulysses all-to-alls)
    while open.

        with traffic_meter() as sent:
            ring_attention(q, k, v).sum().backward()
        print(len(sent), sum(sent))
    """
    sent = []
    _meters.append(sent)
    try:
        yield sent
    finally:
        _meters.remove(sent)


def record_traffic(nbytes):
    """Adds one message of ``nbytes`` to every open traffic_meter."""
    for sent in _meters:
        sent.append(nbytes)


class RingComm:
    """Peers of this rank in ``group`` and at most one pending send/recv pair.

    ``tag`` keeps rings between the same peers apart on backends that match messages by tag (gloo);
    the backward pass runs one ring for K/V and one for the dK/dV accumulators. ``members`` (group
    ranks in ring order, this rank among them) makes a sub-ring, as the hierarchical ring does. Every rank makes the
    same sequence of calls with the same distances, so sends and receives pair up in order (NCCL).
    """

    def __init__(self, group=None, tag=0, members=None):
        self.group = group
        ranks_of = group if group is not None else dist.group.WORLD
        # the ring's order: group ranks 0..w-1, or the sub-ring ``members`` (e.g. the GPUs of one node)
        members = range(dist.get_world_size(group)) if members is None else members
        self._ring = [dist.get_global_rank(ranks_of, r) for r in members]
        self._index = list(members).index(dist.get_rank(group))
        self.tag = tag
        self._pending = []

    def peer(self, distance):
        """Global rank of the ring member ``distance`` places after this one (negative: before)."""
        return self._ring[(self._index + distance) % len(self._ring)]

    def send_recv(self, send, recv=None, distance=1):
        """Starts sending ``send`` to the rank ``distance`` places on (default: the next rank) and
        receiving a tensor of the same shape from the rank ``distance`` places back into ``recv``
        (allocated when None); returns ``recv``, valid after ``wait()``."""
        if self._pending:
            raise RuntimeError("RingComm.send_recv called with a transfer still pending; call wait() first")
        recv = torch.empty_like(send) if recv is None else recv
        ops = [dist.P2POp(dist.isend, send, self.peer(distance), self.group, self.tag),
               dist.P2POp(dist.irecv, recv, self.peer(-distance), self.group, self.tag)]
        self._pending = dist.batch_isend_irecv(ops)
        record_traffic(send.numel() * send.element_size())
        return recv

    def wait(self):
        for request in self._pending:
            request.wait()
        self._pending = []
