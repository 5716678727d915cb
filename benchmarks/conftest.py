"""The benchmark suite's grid and its one measuring helper.

``pytest benchmarks/ --benchmark-only`` on a GPU times forward, backward and forward+backward for
every registered kind (attnkit/bench/kinds/) against every baseline, over N = 512..32k,
D = 64 and 128, bf16. On a CPU the same command runs a tiny grid on the torch backend, so CI
exercises the suite in seconds. Under pytest-xdist, pytest-benchmark disables timing and each
benchmark runs once (a smoke test).

Narrow the grid with ``-k`` or the environment: ``ATTNKIT_BENCH_N=1024,4096``,
``ATTNKIT_BENCH_D=128``, ``ATTNKIT_BENCH_MODES=fwd``, ``ATTNKIT_BENCH_IMPLS=attnkit,sdpa-flash``.

Every benchmark records in ``extra_info``: TFLOP/s and GB/s (from the median; flash-attention's
FLOP convention, see attnkit/bench/flops.py), FLOPs, bytes and the measured peak memory above the
inputs (attnkit/bench/memory.py). A point that cannot run here (not installed, unsupported mask)
or runs out of memory is skipped with the reason; a smaller N of the same line that was out of
memory or too slow skips the larger ones.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace

import pytest
import torch

from attnkit.bench import KINDS, Point
from attnkit.bench.memory import available_cpu_memory, measure_peak
from attnkit.bench.runner import classify_error, clear_grads, prepare_call
from attnkit.bench.sweep import Grid, gpu_grid

ON_GPU = torch.cuda.is_available()
#: Slower than this (median, seconds): larger N of the same line are skipped.
SLOW_S = 5.0 if ON_GPU else 1.0
#: Time budget per benchmark for choosing the number of rounds.
ROUND_BUDGET_S = 1.0 if ON_GPU else 0.2


def _env_list(name: str, cast=str):
    text = os.environ.get(name)
    return tuple(cast(x) for x in text.split(",") if x.strip()) if text else None


def suite_grid() -> Grid:
    if ON_GPU:
        grid = replace(gpu_grid("cuda"), modes=("fwd", "bwd", "fwd+bwd"))
    else:  # tiny: the suite itself is what CI tests on the CPU
        grid = Grid("cpu", "float32", (128, 256), (32,), ("fwd", "bwd", "fwd+bwd"), batch=1, heads=2,
                    lora_hidden=128, lora_rank=8)
    overrides = {"ns": _env_list("ATTNKIT_BENCH_N", int), "ds": _env_list("ATTNKIT_BENCH_D", int),
                 "modes": _env_list("ATTNKIT_BENCH_MODES"), "impls": _env_list("ATTNKIT_BENCH_IMPLS")}
    return replace(grid, **{k: v for k, v in overrides.items() if v is not None})


def points_for(op: str) -> list:
    """``pytest.param`` points of every kind with this op, with readable ids."""
    from attnkit.bench.sweep import build_points

    grid = suite_grid()
    grid = replace(grid, kinds=tuple(k for k, kind in KINDS.items() if kind.op == op))
    params = []
    for p in build_points(grid):
        shape = f"D{p.d}" if p.d else f"h{p.hidden}r{p.rank}"
        params.append(pytest.param(p, id=f"{p.kind}-{p.impl}-{p.mode}-{shape}-N{p.n}"))
    return params


_stopped: dict[tuple, str] = {}  # series -> why larger N are skipped


def run_benchmark(benchmark, point: Point) -> None:
    """Build, warm up, measure memory, then time ``point`` with pytest-benchmark."""
    reason = _stopped.get(point.series)
    if reason:
        pytest.skip(reason)
    kind = KINDS[point.kind]
    impl = kind.impls[point.impl]
    cap = available_cpu_memory()
    if not ON_GPU and cap and impl.predict_bytes and impl.predict_bytes(point) > cap / 4:
        pytest.skip(f"oom: predicted {impl.predict_bytes(point) / 2**30:.1f} GiB is over a quarter "
                    "of the available memory")
    threads = torch.get_num_threads()
    if not ON_GPU:
        torch.set_num_threads(1)  # stable medians on a shared CPU; restored below
    try:
        _measure(benchmark, point, kind)
    finally:
        torch.set_num_threads(threads)
        if ON_GPU:
            torch.cuda.empty_cache()


def _measure(benchmark, point: Point, kind) -> None:
    import time

    try:
        workload = kind.impls[point.impl].build(point, point.mode != "fwd")
        call = prepare_call(workload, point.mode, point.device)
        call()  # compilation and autotuning stay out of the timings
        t0 = time.perf_counter()
        call()
        one = time.perf_counter() - t0
        # one call, no gc.collect (0.3 s each with transformers loaded; this process is shared)
        # gradients dropped first, so the peak includes the ones this call computes
        peak = measure_peak(call, point.device, cpu_repeats=1, collect=False,
                            setup=lambda: clear_grads(workload.params))
    except Exception as exc:
        status, reason = classify_error(exc)
        if status == "error":
            raise
        if status == "oom":
            _stopped[point.series] = f"oom already at N = {point.n}"
        pytest.skip(f"{status}: {reason}")
    if one > SLOW_S:
        _stopped[point.series] = f"N = {point.n} took {one:.1f} s (over {SLOW_S:g} s)"
    flops, nbytes = kind.flops(point), kind.bytes(point)
    benchmark.group = f"{point.kind} {point.mode} " + (f"D{point.d}" if point.d else "LoRA") + f" N{point.n}"
    benchmark.extra_info.update(
        kind=point.kind, impl=point.impl, baseline=kind.impls[point.impl].baseline, mode=point.mode,
        batch=point.batch, heads=point.heads, n=point.n, d=point.d, hidden=point.hidden,
        rank=point.rank, dtype=point.dtype, device=point.device, flops=flops, bytes=nbytes,
        peak_mem_bytes=peak,
    )
    rounds = int(min(50, max(3, ROUND_BUDGET_S / max(one, 1e-6))))
    try:
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=1 if ON_GPU else 0, iterations=1)
    except Exception as exc:
        status, reason = classify_error(exc)
        if status == "error":
            raise
        pytest.skip(f"{status}: {reason}")
    stats = getattr(benchmark, "stats", None)
    median = getattr(getattr(stats, "stats", None), "median", None)
    if median:
        benchmark.extra_info.update(time_ms=median * 1e3, tflops=flops / median / 1e12,
                                    gbps=nbytes / median / 1e9)


class _NoBenchmark:
    """Stands in for pytest-benchmark's fixture when the plugin is not installed: runs once."""

    def __init__(self):
        self.extra_info: dict = {}
        self.group = None
        self.stats = None

    def pedantic(self, fn, rounds=1, warmup_rounds=0, iterations=1, **_):
        return fn()


if importlib.util.find_spec("pytest_benchmark") is None:

    @pytest.fixture
    def benchmark():
        return _NoBenchmark()
