"""Timing: CPU with ``time.perf_counter`` and interleaved repeats; CUDA with ``triton.testing.do_bench``.

Every comparison is timed in one call, baselines included: on the CPU the candidates run round-robin
(A, B, C, A, B, C, ...) so that a slow spell of a shared machine hits all of them alike, and the
median of each is reported with its spread (the interquartile range).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _quantiles(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], statistics.median(xs), xs[-1]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def time_cpu(
    fns: dict[str, Callable[[], object]], *, reps: int = 9, warmup: int = 1, min_time: float = 0.0, settle: bool = False
) -> dict[str, dict]:
    """Median seconds per call of each function, interleaved; ``min_time``: keep repeating until each
    candidate has run at least that long in total (and ``reps`` times).

    ``settle``: in every round each candidate runs once untimed right before its timed call. Without
    it, the call after a memory-hungry candidate (the eager path's N x N matrices) pays for the
    allocator's state change (fresh pages: measured +2.3 ms on a 6.3 ms op, in a third of the calls),
    which says more about the neighbour than about the candidate; in a model the same op runs in a
    steady allocation pattern."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    r = 0
    while r < reps or (min_time and min(sum(s) for s in samples.values()) < min_time):
        for name, fn in fns.items():
            if settle:
                fn()
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        r += 1
    out = {}
    for name, s in samples.items():
        q1, med, q3 = _quantiles(s)
        out[name] = {"median_s": med, "q1_s": q1, "q3_s": q3, "reps": len(s)}
    return out


def time_cuda(fns: dict[str, Callable[[], object]], *, warmup: int = 25, rep: int = 100, rounds: int = 3) -> dict[str, dict]:
    """Median seconds per call with ``triton.testing.do_bench`` (warmed up, L2 flushed between calls),
    interleaved over ``rounds`` rounds; the median of the rounds' medians is reported."""
    from triton.testing import do_bench

    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            ms = do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
            samples[name].append(ms / 1e3)
    out = {}
    for name, s in samples.items():
        q1, med, q3 = _quantiles(s)
        out[name] = {"median_s": med, "q1_s": q1, "q3_s": q3, "reps": len(s)}
    return out


def time_fns(fns: dict[str, Callable[[], object]], device: torch.device, *, quick: bool = False, **kw) -> dict[str, dict]:
    """``time_cuda`` on a GPU, ``time_cpu`` otherwise (``quick``: the fewest repeats, for smoke runs)."""
    if torch.device(device).type == "cuda":
        return time_cuda(fns, **({"warmup": 1, "rep": 3, "rounds": 1} if quick else kw))
    return time_cpu(fns, **({"reps": 1, "warmup": 0} if quick else kw))


def peak_cuda_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated on ``device`` while ``fn`` runs (above what was allocated before)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before
