"""The ring: who sends to whom, and one double-buffered transfer in flight.

Each step a rank sends the block it holds to the next rank and receives the previous rank's block
(or, for the reverse ring and the return of accumulators, to and from ranks further away).
``send_recv`` only *starts* the transfer (``torch.distributed.batch_isend_irecv``); the caller computes
on the block it holds and calls ``wait`` when it needs the received one, so step s+1's transfer
overlaps step s's compute. NCCL for CUDA tensors, gloo for CPU tensors (whatever backend the group has).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist

_meters = []  # open traffic_meter() lists


def as_group(group, name="group"):
    """A process group from what a caller may pass where dist-attn takes one: None (the default group), a
    ``ProcessGroup``, or a one-dimensional ``DeviceMesh`` (e.g. ``mesh["cp"]`` of
    ``init_device_mesh(..., mesh_dim_names=("dp", "cp"))``), whose group is used."""
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            names = group.mesh_dim_names or ()
            hint = f"pass one dimension, e.g. mesh[{names[-1]!r}]" if names else "pass a one-dimensional DeviceMesh"
            raise ValueError(f"{name}: a DeviceMesh of {group.ndim} dimensions {names} does not say which dimension "
                             f"the sequence is sharded over; {hint}")
        return group.get_group()
    return group


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


class RingTimeoutError(RuntimeError):
    """A ring transfer or the peers' check did not complete: a peer rank failed, died, or never made the
    matching call, and the backend gave up (its timeout, or the connection closed). Chained (``from``)
    to the backend's error."""


def group_timeout_s(group=None):
    """The timeout of ``group``'s backend in seconds (``init_process_group(timeout=...)``, or
    ``new_group(timeout=...)``), or None when the backend does not say."""
    try:
        group = group if group is not None else dist.group.WORLD
        for device in group._device_types:
            timeout = group._get_backend(device).options._timeout
            return timeout.total_seconds()
    except Exception:  # private API: a message helper must not fail
        return None
    return None


def backend_message(error):
    """The first line of a backend error, without gloo's [source file:line] prefix."""
    text = str(error).strip()
    if not text:
        return type(error).__name__
    line = re.sub(r"^\[[^\]]*\]\s*", "", text.splitlines()[0])
    return line.split(". This is typically")[0]  # gloo's advice to check the peer's log: the hint says so


def peer_failure_hint(group=None):
    timeout = group_timeout_s(group)
    limit = f"the process group's timeout is {timeout:g} s" if timeout is not None else "see the process group's timeout"
    return (f"A peer rank failed, exited, or never called ring_attention ({limit}; set it with "
            f"init_process_group(timeout=...)): look for that rank's own error first")


class RingComm:
    """Peers of this rank in ``group`` and at most one pending send/recv pair.

    ``tag`` keeps rings between the same peers apart on backends that match messages by tag (gloo);
    the backward pass runs one ring for K/V and one for the dK/dV accumulators. ``members`` (group
    ranks in ring order, this rank among them) makes a sub-ring, as the hierarchical ring does. Every rank makes the
    same sequence of calls with the same distances, so sends and receives pair up in order (NCCL).
    """

    def __init__(self, group=None, tag=0, members=None, label="ring"):
        self.group = group
        self.label = label  # names the ring in error messages, e.g. "backward K/V ring"
        ranks_of = group if group is not None else dist.group.WORLD
        # the ring's order: group ranks 0..w-1, or the sub-ring ``members`` (e.g. the GPUs of one node)
        members = range(dist.get_world_size(group)) if members is None else members
        self._ring = [dist.get_global_rank(ranks_of, r) for r in members]
        self._index = list(members).index(dist.get_rank(group))
        self.tag = tag
        self._pending = []
        self._transfer = (None, None, 0)  # (sends to, receives from, transfers started): for error messages

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
        self._transfer = (self.peer(distance), self.peer(-distance), self._transfer[2] + 1)
        ops = [dist.P2POp(dist.isend, send, self._transfer[0], self.group, self.tag),
               dist.P2POp(dist.irecv, recv, self._transfer[1], self.group, self.tag)]
        try:
            self._pending = dist.batch_isend_irecv(ops)
        except RuntimeError as error:  # gloo/NCCL errors (DistBackendError is one)
            raise self._failure("could not start", error) from error
        record_traffic(send.numel() * send.element_size())
        return recv

    def wait(self):
        pending, self._pending = self._pending, []
        for index, request in enumerate(pending):
            try:
                request.wait()
            except RuntimeError as error:  # gloo: timeout or connection closed; NCCL: DistBackendError
                which = ("send", "receive")[index] if len(pending) == 2 else None  # NCCL: one request for both
                what = "timed out" if "timed out" in str(error).lower() else "failed"
                raise self._failure(what, error, which) from error

    def _failure(self, what, error, which=None):
        """The RingTimeoutError of this transfer; ``which``: "send" or "receive" when known."""
        to, source, count = self._transfer
        waiting = {"send": f" waiting for rank {to} (send)", "receive": f" waiting for rank {source} (receive)"}
        return RingTimeoutError(
            f"ring_attention: rank {dist.get_rank()}: transfer {count} of the {self.label} (tag {self.tag}) "
            f"{what}{waiting.get(which, '')}; it sends to rank {to} and receives from rank {source}. "
            f"{peer_failure_hint(self.group)}. Backend: {backend_message(error)}")
