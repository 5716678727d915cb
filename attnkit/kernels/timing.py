"""Timing GPU work with CUDA events, shared by the measured LoRA dispatch and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["cuda_event_times"]


def cuda_event_times(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Milliseconds of each of ``reps`` calls of ``fn`` on the current CUDA stream, after
    ``warmup`` untimed calls (which also absorb Triton's compiles and autotuning)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times
