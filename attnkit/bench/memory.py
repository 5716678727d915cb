"""Peak memory of one call, measured (never computed from a formula).

Both devices report the same quantity: the high-water mark of memory in use *during* the call
above what was in use just before it. Inputs are therefore excluded; outputs, workspace, saved
activations and gradients are included.

* CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated`` (the caching
  allocator's own count, so cached-but-free blocks do not count).
* CPU: the process's resident set. Linux lets a process reset its RSS high-water mark (writing
  ``5`` to ``/proc/self/clear_refs`` sets ``VmHWM`` to the current RSS), so the peak of one call is
  ``VmHWM`` after it minus ``VmRSS`` before it. Two glibc settings keep the call from silently
  reusing memory an earlier call left resident: ``malloc_trim`` first returns freed heap pages to
  the OS, and during the measured call the mmap threshold is pinned at 128 KiB, so every larger
  buffer is freshly mapped and counted (glibc otherwise raises the threshold after each large
  free and serves the next tensors from resident heap). Afterwards the threshold is set to
  glibc's dynamic maximum (32 MiB), the steady state timed calls would reach. ``attnkit bench``
  runs the CPU points in a worker subprocess, away from the CLI's own allocations; where the
  reset is unavailable (not Linux) it falls back to ``getrusage`` ``ru_maxrss`` growth, which can
  only see peaks above the process's earlier high-water mark.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import re
import resource
import sys
from collections.abc import Callable

import torch

__all__ = ["measure_peak", "cpu_memory_method", "available_cpu_memory"]

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS) as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # musl or another libc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # mallopt parameter number (glibc malloc.h)


def _set_mmap_threshold(nbytes: int) -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def cpu_memory_method() -> str:
    """How CPU peaks are measured on this machine (recorded in results.json)."""
    if _status_kib("VmHWM") is not None and os.access(_CLEAR_REFS, os.W_OK):
        return ("VmHWM after resetting it via /proc/self/clear_refs, minus VmRSS before the call "
                "(malloc_trim first, glibc mmap threshold pinned at 128 KiB; smallest of three calls)")
    return "growth of getrusage(RUSAGE_SELF).ru_maxrss across the call (a lower bound)"


def measure_peak(fn: Callable[[], object], device: str, cpu_repeats: int = 3, collect: bool = True,
                 setup: Callable[[], object] | None = None) -> int:
    """Run ``fn`` and return its peak memory in bytes above the memory in use before it.

    ``setup`` runs before each measured call, before "in use before" is read: the runner drops
    the previous call's gradients there, so the gradients a call computes count in its peak.

    On the CPU the smallest of ``cpu_repeats`` calls: a call's own peak is the same every time,
    while one-off allocations around it (lazily grown library buffers) only ever add to it.
    ``collect`` runs the garbage collector first (about 0.3 s once transformers is imported,
    unless the caller has ``gc.freeze()``-ed the long-lived objects, as the sweep does).
    """
    if device.startswith("cuda"):
        if setup is not None:
            setup()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del out
        return max(int(peak), 0)
    return min(_cpu_peak(fn, collect, setup) for _ in range(max(1, cpu_repeats)))


def _cpu_peak(fn: Callable[[], object], collect: bool, setup: Callable[[], object] | None) -> int:
    if setup is not None:
        setup()
    if collect:
        gc.collect()
    _set_mmap_threshold(128 * 1024)
    _malloc_trim()
    try:
        rss_before = _status_kib("VmRSS")
        if rss_before is not None and _reset_hwm():
            out = fn()
            hwm = _status_kib("VmHWM") or rss_before
            del out
            return max(hwm - rss_before, 0) * 1024
        before = _maxrss_bytes()
        out = fn()
        del out
        return max(_maxrss_bytes() - before, 0)
    finally:
        _set_mmap_threshold(32 * 2**20)


def available_cpu_memory() -> int | None:
    """Bytes the OS reports as available (``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.MULTILINE)
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None
