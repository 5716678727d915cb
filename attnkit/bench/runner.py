"""Measuring points: build, warm up, measure peak memory, time; never crash on a bad point.

:func:`run_points` is the one measuring loop. ``attnkit bench`` calls it in-process on a GPU and in
a worker subprocess on the CPU (``worker.py``); the pytest-benchmark suite uses
:func:`prepare_call` and :func:`classify_error` directly.

Every point becomes one row. Its ``status`` is ``ok``, ``oom`` (out of memory, or a CPU point
whose predicted memory is over the cap), ``skipped`` (the implementation cannot run here, the
time budget ran out, or a smaller N of the same line was already too slow or out of memory)
or ``error`` (anything else, with the exception's text).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from .memory import measure_peak
from .registry import KINDS, Point, Unavailable, Workload
from .timing import time_fn

#: Prefix of each row the CPU worker subprocess (``worker.py``) writes on stdout. Defined here,
#: not in worker.py, so that importing the package does not import the module ``python -m``
#: then runs (which made Python warn in every worker).
ROW_MARKER = "@@ROW "

__all__ = ["ROW_MARKER", "RunOptions", "run_point", "run_points", "prepare_call", "clear_grads",
           "classify_error", "base_row"]

#: RuntimeError texts that mean "this SDPA backend cannot take these inputs", not a failure.
_UNSUPPORTED = ("no available kernel", "no viable backend", "not supported", "unsupported")


@dataclass(frozen=True)
class RunOptions:
    """How points are measured.

    ``mem_cap_bytes``: CPU points whose predicted memory exceeds it are recorded as ``oom``
    without running (a CPU has no allocator that fails cleanly; it swaps or gets killed).
    ``deadline``: ``time.time()`` after which the remaining points are skipped.
    ``slow_s``: when a point's median exceeds it, larger N of the same line are skipped.
    ``threads``: CPU threads for torch (0 = torch's default), set by the worker subprocess.
    ``freeze_gc``: after each point, ``gc.freeze()`` what survives, so later collections skip the
    long-lived objects (a full collection takes ~0.3 s once transformers is imported); for the
    sweep's own processes only, as frozen objects are never collected.
    ``compile_reserve_s``: with a ``deadline``, points of tier-2 implementations (a long set-up such
    as torch.compile, which cannot be interrupted) are skipped once less than this is left.
    """

    mem_cap_bytes: float | None = None
    deadline: float | None = None
    slow_s: float = float("inf")
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cpu_budget_s: float = 0.5
    min_reps: int = 3
    threads: int = 0
    freeze_gc: bool = False
    compile_reserve_s: float = 60.0


def classify_error(exc: BaseException) -> tuple[str, str]:
    """``(status, reason)`` for an exception raised by a point."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0][:300]
    if isinstance(exc, Unavailable):
        return "skipped", str(exc)
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, MemoryError) or (oom_type and isinstance(exc, oom_type)) or \
            "out of memory" in text.lower():
        return "oom", first
    if isinstance(exc, NotImplementedError) or (
            isinstance(exc, RuntimeError) and any(s in text.lower() for s in _UNSUPPORTED)):
        return "skipped", first  # e.g. FlexAttention's backward on the CPU
    return "error", first


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    def call():
        out = fn()
        _sync(device)
        return out
    return call


def clear_grads(params) -> None:
    """Drop the gradients of ``params`` (``p.grad = None``)."""
    for p in params:
        p.grad = None


def prepare_call(workload: Workload, mode: str, device: str, *, sync: bool = True) -> Callable[[], object]:
    """The callable one timed iteration runs for ``mode``.

    With ``sync`` (the default) it ends with ``torch.cuda.synchronize()`` on a GPU, as a host timer
    needs; ``sync=False`` is for timers that record CUDA events themselves (``do_bench``), where a
    synchronize inside the call would add the host's wake-up to every sample.
    ``bwd`` runs the forward once here and times ``backward(retain_graph=True)`` alone;
    ``fwd`` runs under ``no_grad`` (inference: nothing saved for backward). The backward modes
    drop the previous call's gradients first; to count the gradients in a peak-memory measurement,
    drop them before it too (``measure_peak(..., setup=lambda: clear_grads(workload.params))``).
    """
    params = workload.params

    def done():
        if sync:
            _sync(device)

    if mode == "fwd":
        def call():
            with torch.no_grad():
                out = workload.fn()
            done()
            return out
    elif mode == "bwd":
        out = workload.fn()
        grad = torch.randn_like(out)

        def call():
            clear_grads(params)
            out.backward(grad, retain_graph=True)
            done()
    elif mode == "fwd+bwd":
        grad = None

        def call():
            nonlocal grad
            clear_grads(params)
            out = workload.fn()
            if grad is None:
                grad = torch.randn_like(out)
            out.backward(grad)
            done()
    else:
        raise ValueError(f"mode must be fwd, bwd or fwd+bwd, got {mode!r}")
    return call


def base_row(point: Point) -> dict:
    """The row fields every status shares: the point, FLOPs and bytes."""
    kind = KINDS[point.kind]
    impl = kind.impls[point.impl]
    return {
        **point.to_dict(), "op": kind.op, "baseline": impl.baseline, "status": "ok", "reason": "",
        "flops": kind.flops(point), "bytes": kind.bytes(point),
        "time_ms": None, "time_ms_p20": None, "time_ms_p80": None, "reps": None,
        "tflops": None, "gbps": None, "peak_mem_bytes": None,
    }


def run_point(point: Point, opts: RunOptions = RunOptions()) -> dict:
    """Measure one point; always returns a row."""
    row = base_row(point)
    impl = KINDS[point.kind].impls[point.impl]
    on_cuda = point.device.startswith("cuda")
    if not on_cuda and opts.mem_cap_bytes is not None and impl.predict_bytes is not None:
        predicted = impl.predict_bytes(point)
        if predicted > opts.mem_cap_bytes:
            row.update(status="oom", reason=f"predicted {predicted / 2**30:.2f} GiB is over the CPU "
                                            f"memory cap of {opts.mem_cap_bytes / 2**30:.2f} GiB; not run")
            return row
    workload = call = timed = None
    try:
        workload = impl.build(point, point.mode != "fwd")
        # do_bench records CUDA events around the call: no synchronize inside it (see prepare_call)
        timed = prepare_call(workload, point.mode, point.device, sync=False)
        call = _synced(timed, point.device)
        call()  # first call: compilation, autotuning, allocator warm-up; surfaces failures
        params = workload.params
        # gradients dropped before each measured call, so the peak includes them
        row["peak_mem_bytes"] = measure_peak(call, point.device, setup=lambda: clear_grads(params))
        t = time_fn(timed, point.device, warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms,
                    min_reps=opts.min_reps, cpu_budget_s=opts.cpu_budget_s)
        row.update(time_ms=t.median_ms, time_ms_p20=t.p20_ms, time_ms_p80=t.p80_ms,
                   reps=t.reps if t.reps > 0 else None)
        if t.median_ms > 0:
            row["tflops"] = row["flops"] / (t.median_ms * 1e-3) / 1e12
            row["gbps"] = row["bytes"] / (t.median_ms * 1e-3) / 1e9
    except Exception as exc:  # a bad point is a row, never a crash of the sweep
        status, reason = classify_error(exc)
        row.update(status=status, reason=reason)
    finally:
        del workload, call, timed
        gc.collect()
        if opts.freeze_gc:
            gc.freeze()
        if on_cuda:
            torch.cuda.empty_cache()
    return row


def run_points(points: Iterable[Point], opts: RunOptions = RunOptions()) -> Iterator[dict]:
    """Measure points in order, yielding one row each.

    Within a line (same kind, impl, mode and shapes except N), once a point is out of memory or
    slower than ``opts.slow_s``, larger N are not run: they are recorded with the reason.
    """
    stopped: dict[tuple, tuple[int, str, str]] = {}  # series -> (n, status, reason)
    for point in points:
        if opts.deadline is not None and time.time() > opts.deadline:
            row = base_row(point)
            row.update(status="skipped", reason="the time budget (--time-budget) ran out")
            yield row
            continue
        if (opts.deadline is not None and KINDS[point.kind].impls[point.impl].tier >= 2
                and opts.deadline - time.time() < opts.compile_reserve_s):
            row = base_row(point)
            row.update(status="skipped", reason=f"less than {opts.compile_reserve_s:g} s of the time "
                                                "budget left for a baseline that compiles first")
            yield row
            continue
        stop = stopped.get(point.series)
        if stop is not None and point.n > stop[0]:
            row = base_row(point)
            row.update(status=stop[1], reason=stop[2])
            yield row
            continue
        row = run_point(point, opts)
        if row["status"] == "oom":
            stopped[point.series] = (point.n, "oom", f"out of memory already at N = {point.n}")
        elif row["status"] == "ok" and row["time_ms"] > opts.slow_s * 1e3:
            stopped[point.series] = (point.n, "skipped", f"N = {point.n} already took "
                                     f"{row['time_ms'] / 1e3:.1f} s (over --slow {opts.slow_s:g} s)")
        yield row
