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


def _worker(rank, world_size, store_path, fn, args, results, pg_timeout_s, threads, backend):
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        results.put((rank, True, fn(rank, world_size, *args)))
    except BaseException:  # reported to the parent, which fails the test with it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class WorldFailed(RuntimeError):
    """A rank raised or died, or the world ran out of time."""


def run_world(world_size, fn, *args, timeout=300, pg_timeout_s=PROCESS_GROUP_TIMEOUT_S, threads=1,
              backend="gloo"):
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` ranks (``threads`` torch threads each);
    returns the per-rank results. ``backend="nccl"`` puts rank r on GPU r.

    ``fn`` must be a module-level function (it is pickled into spawned processes). Raises WorldFailed
    with every failing rank's traceback, when a rank dies, or when the world does not finish within
    ``timeout`` seconds.
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
    outcomes = {}
    try:
        while len(outcomes) < world_size:
            try:
                rank, ok, value = results.get(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                outcomes[rank] = (ok, value)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise WorldFailed(f"world of {world_size} did not finish within {timeout}s "
                                      f"(ranks done: {sorted(outcomes)})") from None
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead:
                    raise WorldFailed(f"ranks {dead} died without reporting (exit codes "
                                      f"{[procs[r].exitcode for r in dead]})")
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        if os.path.exists(store_path):
            os.unlink(store_path)
    failures = {rank: value for rank, (ok, value) in outcomes.items() if not ok}
    if failures:
        raise WorldFailed("\n".join(f"--- rank {rank} ---\n{tb}" for rank, tb in sorted(failures.items())))
    return [outcomes[rank][1] for rank in range(world_size)]
