"""Local multi-process worlds without torchrun: gloo ranks spawned with torch.multiprocessing.

Used by the tests and the CPU benchmarks (and by entry points run without torchrun). Starting a rank
costs seconds (a torch import each), so callers run many cases inside one world. Nothing can hang:
the process group has a timeout, and a world that has not reported within ``timeout`` seconds is
killed and reported as failed.
"""

from __future__ import annotations

import datetime
import os
import queue
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROCESS_GROUP_TIMEOUT_S = 30


_PEER_FAILURE_MARKS = ("connection closed by peer", "connection reset by peer", "timed out", "broken pipe")


def caused_by_peer(error):
    """Whether ``error`` (or an exception it was raised from) says that *another* rank failed: ring_attention's
    RingTimeoutError, a backend error (DistError), or gloo's RuntimeError on a closed connection or a timeout."""
    from dist_attn.comm import RingTimeoutError

    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (RingTimeoutError, dist.DistError)):
            return True
        if isinstance(error, RuntimeError) and any(mark in str(error).lower() for mark in _PEER_FAILURE_MARKS):
            return True
        error = error.__cause__ or error.__context__
    return False


def one_line(error):
    """``Type: first line of the message`` of an exception."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def inject_ring_fault(phase="forward", call=2):
    """Self-test hook of the launch scripts (demo ``--fail-rank``, train ``DIST_ATTN_FAIL_RANK``), not of the
    library: in this process, the ``call``-th local kernel call of ring_attention's ``phase`` raises in the
    middle of the ring (its transfers in flight), as a crashing kernel would."""
    import dist_attn.ring as ring

    name = f"flash_attn_{phase}"
    real, calls = getattr(ring, name), []

    def failing_kernel(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise RuntimeError(f"injected fault: kernel call {call} of the ring {phase} on rank {dist.get_rank()}")
        return real(*args, **kwargs)

    setattr(ring, name, failing_kernel)


def _worker(rank, world_size, store_path, fn, args, results, pg_timeout_s, threads, backend):
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException as error:  # reported to the parent, which fails the test with it
        results.put((rank, False, (traceback.format_exc(), one_line(error), caused_by_peer(error))))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorldFailed(RuntimeError):
    """A rank raised or died, or the world ran out of time. The message: ``summary`` (one line: the
    ranks that failed first and why), then every failed rank's traceback. ``failures``: {rank: its
    traceback, or how it died}; ``root_ranks``: the ranks that failed on their own (not because a
    peer did), in the order the parent learnt of them."""

    def __init__(self, summary, failures=None, root_ranks=()):
        self.summary, self.failures, self.root_ranks = summary, dict(failures or {}), list(root_ranks)
        details = "".join(f"\n--- rank {rank} ---\n{text}" for rank, text in sorted(self.failures.items()))
        super().__init__(summary + details)


def _summary(world_size, failed, unfinished, limit):
    """(one line, root ranks): ``failed`` is [(rank, one-line error, caused by a peer)] in the order they
    came in; the root ranks failed on their own, or (none did) had not finished."""
    roots = [(rank, line) for rank, line, by_peer in failed if not by_peer]
    followers = [(rank, line) for rank, line, by_peer in failed if by_peer]

    def ranks(items):
        return f"rank{'s' if len(items) > 1 else ''} {', '.join(str(r) for r in sorted(items))}"

    parts = [f"rank {rank} failed: {line}" for rank, line in roots]
    if unfinished:
        parts.append(f"{ranks(unfinished)} had not finished {limit}")
    if followers and (roots or unfinished):
        parts.append(f"{'then ' if roots else ''}{ranks([r for r, _ in followers])} failed waiting for "
                     f"{'it' if len(roots) + len(unfinished) == 1 else 'them'}")
    elif followers:
        parts.append(f"{ranks([r for r, _ in followers])} failed waiting for a peer: {followers[0][1]}")
    return f"world of {world_size}: " + "; ".join(parts), [r for r, _ in roots] or unfinished


def run_world(world_size, fn, *args, timeout=300, pg_timeout_s=PROCESS_GROUP_TIMEOUT_S, threads=1,
              backend="gloo"):
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` ranks (``threads`` torch threads each);
    returns the per-rank results. ``backend="nccl"`` puts rank r on GPU r.

    ``fn`` must be a module-level function (it is pickled into spawned processes). Raises WorldFailed
    when a rank raises or dies, or when the world does not finish within ``timeout`` seconds; after the
    first failure the other ranks get ``pg_timeout_s`` + a margin to fail too (their collectives and
    ring transfers time out), and WorldFailed reports every rank that failed by then.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    fd, store_path = tempfile.mkstemp(prefix="dist_attn_store_")
    os.close(fd)
    os.unlink(store_path)  # the file store creates it
    procs = [ctx.Process(target=_worker, args=(rank, world_size, store_path, fn, args, results, pg_timeout_s, threads, backend),
                         daemon=True) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    outcomes, failed = {}, []  # failed: (rank, one-line error, caused by a peer), in the order they came in
    grace = pg_timeout_s + 15  # after a failure: the others' waits time out within pg_timeout_s
    try:
        while len(outcomes) < world_size and time.monotonic() < deadline:
            already_failed = bool(failed)
            try:
                rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                for r, proc in enumerate(procs):
                    if r not in outcomes and proc.exitcode not in (None, 0):
                        outcomes[r] = (False, f"died without reporting (exit code {proc.exitcode})")
                        failed.append((r, f"died (exit code {proc.exitcode})", False))
            else:
                text, line, by_peer = (value, None, None) if ok else value
                outcomes[rank] = (ok, text)  # replaces "died" when the report came in late
                failed = [f for f in failed if f[0] != rank] + ([] if ok else [(rank, line, by_peer)])
            if failed and not already_failed:
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if os.path.exists(store_path):
            os.unlink(store_path)
    unfinished = [rank for rank in range(world_size) if rank not in outcomes]
    if failed or unfinished:
        summary, roots = _summary(world_size, failed, unfinished,
                                  f"{grace:g} s after the first failure" if failed else f"{timeout:g} s")
        failures = {rank: text for rank, (ok, text) in outcomes.items() if not ok}
        raise WorldFailed(summary, failures, roots)
    return [outcomes[rank][1] for rank in range(world_size)]
