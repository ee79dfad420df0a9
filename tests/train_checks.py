"""What the training-parity tests share: a one-process ``launch.train`` reference run with its gradient norms,
and a relative comparison of per-step series."""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple

import torch

from launch import train


class Single(NamedTuple):
    losses: list[float]
    checksum: float
    grad_norms: list[float]  # before clipping, as clip_grad_norm_ returned them


def one_process_run(argv) -> Single:
    """launch.train in this process (no process group, one thread like every spawned rank), with the
    gradient norm of every step recorded."""
    threads, clip = torch.get_num_threads(), torch.nn.utils.clip_grad_norm_
    norms = []

    def recording_clip(*args, **kwargs):
        norms.append(clip(*args, **kwargs).item())
        return norms[-1]

    torch.set_num_threads(1)
    torch.nn.utils.clip_grad_norm_ = recording_clip
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            result = train.main(argv)
    finally:
        torch.set_num_threads(threads)
        torch.nn.utils.clip_grad_norm_ = clip
    return Single(result.losses, result.checksum, norms)


def assert_close(got, expected, rtol):
    assert len(got) == len(expected), (got, expected)
    worst = max(abs(g - e) / abs(e) for g, e in zip(got, expected))
    assert worst <= rtol, f"relative difference {worst:.2e} > {rtol}: {got} vs {expected}"
