"""Faults: a rank that raises, dies or hangs in the middle of the ring makes the others fail with a clear
error within the process group's timeout, never a hang.

Real gloo worlds of 3 ranks (launch/spawn.py) with a short process-group timeout. Rank 1 is the faulty one:
its kernel raises (forward or backward), it exits (``os._exit``), or it hangs (sleeps past the timeout),
at its 2nd kernel call, in the middle of the ring. The other ranks must raise a ``RingTimeoutError`` that
names the ring operation, the peer rank it was waiting for, and the hint; each rank writes how long after
starting its ring call it failed, which must be well inside the timeout (+ a margin) where the failed
rank's connection closes, and about the timeout where it hangs.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
import torch

from launch.spawn import WorldFailed, run_world

WORLD = 3
FAULTY = 1
PG_TIMEOUT_S = 10
MARGIN_S = 5  # scheduling on a loaded 2-core box; the failure itself comes within PG_TIMEOUT_S
HINT = (f"A peer rank failed, exited, or never called ring_attention (the process group's timeout is "
        f"{PG_TIMEOUT_S} s; set it with init_process_group(timeout=...))")


def faulty_ring(rank, world_size, how, phase, outdir):
    """Ring forward + backward; on rank FAULTY the 2nd kernel call of ``phase`` raises, exits or hangs.
    Every rank that raises writes the seconds from its ring call to its error to ``outdir/rank{r}``."""
    import dist_attn.ring as ring

    name = f"flash_attn_{phase}"
    real, calls = getattr(ring, name), []

    def kernel(*args, **kwargs):
        calls.append(1)
        if rank == FAULTY and len(calls) == 2:
            if how == "raise":
                raise RuntimeError(f"injected fault in the {phase} on rank {rank}")
            if how == "exit":
                os._exit(1)
            if how == "hang":
                time.sleep(PG_TIMEOUT_S + 3)  # the others time out meanwhile
                raise RuntimeError(f"hung rank {rank} woke up")
        return real(*args, **kwargs)

    setattr(ring, name, kernel)  # this rank's process only
    q, k, v = (torch.randn(1, 12, 2, 8, requires_grad=True) for _ in range(3))
    start = time.monotonic()
    try:
        ring.ring_attention(q, k, v, causal=False, layout="contiguous").sum().backward()
    except BaseException:
        Path(outdir, f"rank{rank}").write_text(f"{time.monotonic() - start:.3f}")
        raise
    return "finished"


def one_rank_skips_ring_attention(rank, world_size, outdir):
    """Rank FAULTY never calls ring_attention: the others' check_peers all-gather fails."""
    from dist_attn import ring_attention

    if rank == FAULTY:
        time.sleep(2)  # the others are waiting in the all-gather when this rank leaves
        return "skipped"
    x = torch.randn(1, 12, 2, 8)
    start = time.monotonic()
    try:
        ring_attention(x, x, x, layout="contiguous")
    except BaseException:
        Path(outdir, f"rank{rank}").write_text(f"{time.monotonic() - start:.3f}")
        raise
    return "finished"


def run_faulty_world(fn, *args):
    """(WorldFailed, wall seconds, {rank: seconds from its ring call to its error})."""
    start = time.monotonic()
    with pytest.raises(WorldFailed) as failure:
        run_world(WORLD, fn, *args, timeout=120, pg_timeout_s=PG_TIMEOUT_S)
    wall = time.monotonic() - start
    outdir = Path(args[-1])
    times = {int(p.name[4:]): float(p.read_text()) for p in outdir.glob("rank*")}
    return failure.value, wall, times


def check_survivors(error, times, phase_pattern):
    """Ranks 0 and 2 raised RingTimeoutError naming the operation, the peer and the hint."""
    survivors = [r for r in range(WORLD) if r != FAULTY]
    assert sorted(error.failures) == list(range(WORLD)), error
    for rank in survivors:
        text = error.failures[rank]
        last = text.strip().splitlines()[-1]
        assert last.startswith(f"dist_attn.comm.RingTimeoutError: ring_attention: rank {rank}: "), text
        assert re.search(phase_pattern, last), last
        assert re.search(r"((timed out|failed) waiting for rank \d \((send|receive)\)|could not start); it sends to "
                         r"rank \d and receives from rank \d\.", last), last
        assert HINT in last, last
        assert "Backend: " in last and "from error" not in last
        assert "The above exception was the direct cause" in text  # chained to gloo's error
        assert rank in times
    assert f"then ranks {', '.join(map(str, survivors))} failed waiting for it" in error.summary, error.summary
    return survivors


@pytest.mark.timeout(90)
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_rank_that_raises_mid_ring_fails_the_others(phase, tmp_path):
    error, wall, times = run_faulty_world(faulty_ring, "raise", phase, str(tmp_path))
    assert error.root_ranks == [FAULTY]
    assert error.summary.startswith(f"world of {WORLD}: rank {FAULTY} failed: RuntimeError: injected fault in the "
                                    f"{phase} on rank {FAULTY}; then ranks 0, 2"), error.summary
    # the forward fault can reach a survivor in its backward (it had every block it needed), not the reverse
    survivors = check_survivors(error, times, r"transfer \d of the (forward|backward) [a-zA-Z/ -]*ring \(tag \d+\)"
                                if phase == "forward" else r"transfer \d of the backward [a-zA-Z/ -]*ring \(tag \d+\)")
    # the faulty rank's connections close as it exits: the others fail at once, not after the timeout
    assert all(times[r] < PG_TIMEOUT_S + MARGIN_S for r in survivors), times
    assert wall < 2 * PG_TIMEOUT_S + 30, wall


@pytest.mark.timeout(90)
def test_a_rank_that_dies_mid_ring_fails_the_others(tmp_path):
    error, wall, times = run_faulty_world(faulty_ring, "exit", "forward", str(tmp_path))
    assert error.root_ranks == [FAULTY]
    assert error.summary.startswith(f"world of {WORLD}: rank {FAULTY} failed: died (exit code 1)"), error.summary
    assert "died without reporting (exit code 1)" in error.failures[FAULTY]
    survivors = check_survivors(error, times, r"transfer \d of the (forward|backward) [a-zA-Z/ -]*ring")
    assert all(times[r] < PG_TIMEOUT_S + MARGIN_S for r in survivors), times
    assert wall < 2 * PG_TIMEOUT_S + 30, wall


@pytest.mark.timeout(90)
def test_a_hung_rank_makes_the_others_time_out_within_the_process_group_timeout(tmp_path):
    error, wall, times = run_faulty_world(faulty_ring, "hang", "forward", str(tmp_path))
    assert error.root_ranks == [FAULTY]
    assert f"rank {FAULTY} failed: RuntimeError: hung rank {FAULTY} woke up" in error.summary, error.summary
    survivors = check_survivors(error, times, r"transfer \d of the (forward|backward) [a-zA-Z/ -]*ring")
    assert any("timed out waiting for rank" in error.failures[r].strip().splitlines()[-1] for r in survivors)
    for rank in survivors:
        # a survivor may first wait a little for its earlier blocks; then at most one timeout
        assert PG_TIMEOUT_S - 1 <= times[rank] <= PG_TIMEOUT_S + MARGIN_S, times
    assert wall < PG_TIMEOUT_S + 3 + 30, wall  # the hung rank's sleep, plus starting the world


@pytest.mark.timeout(90)
def test_a_rank_that_never_calls_ring_attention_fails_the_check_of_peers(tmp_path):
    error, wall, times = run_faulty_world(one_rank_skips_ring_attention, str(tmp_path))
    assert sorted(error.failures) == [0, 2], error
    for rank in (0, 2):
        last = error.failures[rank].strip().splitlines()[-1]
        assert last.startswith(f"dist_attn.comm.RingTimeoutError: ring_attention: rank {rank}: the all-gather of "
                               f"every rank's metadata before the ring (check_peers) did not complete. {HINT}"), last
        assert times[rank] < PG_TIMEOUT_S + MARGIN_S, times
    assert "ranks 0, 2 failed waiting for a peer: RingTimeoutError: ring_attention: rank" in error.summary, \
        error.summary
