"""Timing one call: medians, with warm-up kept out of the figures.

CUDA: :func:`triton.testing.do_bench` (it flushes L2 between calls and synchronizes), or CUDA
events when Triton is missing; there ``fn`` must not synchronize itself (the end event is recorded
after ``fn`` returns, so a synchronize inside it would add the host's wake-up to every sample).
CPU: ``time.perf_counter`` around each call. The caller has already run the function once (that
first call compiles, autotunes and allocates), so every timed call is warm.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..kernels.timing import cuda_event_times

__all__ = ["Timing", "time_fn"]


@dataclass(frozen=True)
class Timing:
    """Milliseconds: median and the 20th/80th percentiles of ``reps`` calls."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int


def _quantiles(ms: list[float]) -> Timing:
    s = sorted(ms)

    def q(p: float) -> float:
        return s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]

    return Timing(statistics.median(s), q(0.2), q(0.8), len(s))


def _cuda_events(fn: Callable[[], object], warmup: int, reps: int) -> Timing:
    return _quantiles(cuda_event_times(fn, warmup, reps))


def time_fn(fn: Callable[[], object], device: str, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 3, max_reps: int = 50, cpu_budget_s: float = 0.5) -> Timing:
    """Time ``fn`` (already run once) on ``device``.

    CUDA: ``do_bench(fn, warmup=warmup_ms, rep=rep_ms)``. CPU: one more warm-up call, then calls
    until ``cpu_budget_s`` has passed, at least ``min_reps`` and at most ``max_reps`` of them.
    """
    if device.startswith("cuda"):
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_events(fn, warmup=3, reps=max(min_reps, 20))
        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
        return Timing(float(med), float(p20), float(p80), -1)  # do_bench picks the count itself
    fn()
    ms: list[float] = []
    t_end = time.perf_counter() + cpu_budget_s
    while len(ms) < min_reps or (len(ms) < max_reps and time.perf_counter() < t_end):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(ms)
