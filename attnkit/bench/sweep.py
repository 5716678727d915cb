"""Sweeps: the grids, the environment record, and running points in-process or in a worker.

On a GPU the points run in this process (CUDA's allocator reports peaks itself, and Triton's
autotuning results stay cached). On the CPU they run in worker subprocesses, one per kind, so the
RSS peaks are not disturbed by the CLI itself; a worker that dies costs one point, recorded as
``oom`` when it was killed by SIGKILL (the kernel's OOM killer) and ``error`` otherwise.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import kinds as _kinds  # noqa: F401  (registers the kinds)
from .kinds import LORA_HIDDEN_RANK
from .registry import KINDS, Point
from .runner import ROW_MARKER as MARKER
from .runner import RunOptions, base_row, run_points

__all__ = ["Grid", "gpu_grid", "cpu_grid", "quick_grid", "grid_for", "build_points", "run_sweep",
           "environment", "add_speedups"]


@dataclass(frozen=True)
class Grid:
    """The cross product a sweep measures. ``impls=None`` takes every registered implementation."""

    device: str
    dtype: str
    ns: tuple[int, ...]
    ds: tuple[int, ...]
    modes: tuple[str, ...]
    batch: int
    heads: int
    kinds: tuple[str, ...] = field(default_factory=lambda: tuple(KINDS))
    impls: tuple[str, ...] | None = None
    lora_hidden: int = 512
    lora_rank: int = 16


def gpu_grid(device: str = "cuda") -> Grid:
    """N from 512 to 32k, D = 64 and 128, bf16, B = 2, H = 16; LoRA at hidden 4096, rank 16."""
    hidden, rank = LORA_HIDDEN_RANK["cuda"]
    return Grid(device, "bfloat16", (512, 1024, 2048, 4096, 8192, 16384, 32768), (64, 128),
                ("fwd", "fwd+bwd"), batch=2, heads=16, lora_hidden=hidden, lora_rank=rank)


def cpu_grid() -> Grid:
    """The CPU default: fp32, the torch backend, N up to 8k, forward and forward+backward."""
    hidden, rank = LORA_HIDDEN_RANK["cpu"]
    return Grid("cpu", "float32", (256, 512, 1024, 2048, 4096, 8192), (64,), ("fwd", "fwd+bwd"),
                batch=1, heads=4, lora_hidden=hidden, lora_rank=rank)


def quick_grid(device: str) -> Grid:
    """``--quick``: a few N per kind, forward only on the CPU (about 40 s on 2 cores)."""
    if device.startswith("cuda"):
        return replace(gpu_grid(device), ns=(1024, 4096, 16384), ds=(128,))
    return replace(cpu_grid(), ns=(256, 512, 1024, 2048), modes=("fwd",))


def grid_for(device: str, quick: bool) -> Grid:
    if quick:
        return quick_grid(device)
    return gpu_grid(device) if device.startswith("cuda") else cpu_grid()


def build_points(grid: Grid) -> list[Point]:
    """Points ordered by implementation tier (attnkit, baselines, compiled baselines), then kind,
    impl, mode, D and N ascending (the skip rules need N ascending within a line)."""
    points = []
    for kind_name in grid.kinds:
        if kind_name not in KINDS:
            raise ValueError(f"unknown benchmark kind {kind_name!r}; known: {', '.join(KINDS)}")
        kind = KINDS[kind_name]
        impls = [i for i in kind.impls if grid.impls is None or i in grid.impls]
        ds = grid.ds if kind.uses_head_dim else (0,)
        # a LoRA kind may fix its own (hidden, rank) for a grid, or have no points on it (None)
        shape = getattr(kind, "point_shape", lambda g: (g.lora_hidden, g.lora_rank))(grid)
        if shape is None:
            continue
        for impl in impls:
            for mode in grid.modes:
                for d in ds:
                    for n in sorted(grid.ns):
                        lora = not kind.uses_head_dim
                        points.append(Point(
                            kind_name, impl, mode, grid.batch, 0 if lora else grid.heads, n, d,
                            grid.dtype, grid.device, shape[0] if lora else 0,
                            shape[1] if lora else 0))
    return sorted(points, key=lambda p: KINDS[p.kind].impls[p.impl].tier)  # stable


def _worker_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the checkout or site-packages holding attnkit
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run_in_workers(points: list[Point], opts: RunOptions, log) -> Iterable[dict]:
    """Run each kind's points in a worker subprocess, restarting it after a crash."""
    by_kind: dict[str, list[Point]] = {}
    for p in points:
        by_kind.setdefault(p.kind, []).append(p)
    for todo in by_kind.values():
        dead: set[tuple] = set()
        while todo:
            job = json.dumps({"points": [p.to_dict() for p in todo], "options": opts.__dict__})
            proc = subprocess.Popen([sys.executable, "-m", "attnkit.bench.worker"], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=log, text=True, env=_worker_env())
            proc.stdin.write(job)
            proc.stdin.close()
            done = 0
            for line in proc.stdout:
                if line.startswith(MARKER):
                    done += 1
                    yield json.loads(line[len(MARKER):])
            rc = proc.wait()
            todo = todo[done:]
            if not todo:
                break
            crashed = todo.pop(0)  # the worker died measuring this point
            row = base_row(crashed)
            killed = rc in (-9, 137)
            row.update(status="oom" if killed else "error",
                       reason=f"the measuring subprocess died (exit code {rc})"
                              + ("; killed, most likely by the OOM killer" if killed else ""))
            dead.add(crashed.series)
            yield row
            while todo and todo[0].series in dead:  # the same line at larger N would die too
                p = todo.pop(0)
                skipped = base_row(p)
                skipped.update(status=row["status"], reason=f"{row['status']} already at N = {crashed.n}")
                yield skipped


def run_sweep(points: list[Point], opts: RunOptions, *, isolate: bool | None = None,
              on_row: Callable[[dict], None] | None = None, log_path: Path | None = None) -> list[dict]:
    """Measure ``points``; ``isolate`` (default: on the CPU) runs them in worker subprocesses."""
    if isolate is None:
        isolate = bool(points) and not points[0].device.startswith("cuda")
    rows = []
    log = open(log_path, "a") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        source = _run_in_workers(points, opts, log) if isolate else run_points(points, opts)
        for row in source:
            rows.append(row)
            if on_row:
                on_row(row)
    finally:
        if log_path:
            log.close()
    return add_speedups(rows)


def add_speedups(rows: list[dict]) -> list[dict]:
    """Give each non-baseline row ``speedup`` = best baseline time / its time at the same point,
    and ``best_baseline`` (the impl's name); ``None`` where no baseline ran."""
    best: dict[tuple, tuple[float, str]] = {}
    for r in rows:
        if r["baseline"] and r["status"] == "ok":
            key = _point_key(r)
            if key not in best or r["time_ms"] < best[key][0]:
                best[key] = (r["time_ms"], r["impl"])
    for r in rows:
        r["speedup"], r["best_baseline"] = None, None
        if r["baseline"]:
            continue
        b = best.get(_point_key(r))
        if b:
            r["best_baseline"] = b[1]
            if r["status"] == "ok":
                r["speedup"] = b[0] / r["time_ms"]
    return rows


def _point_key(r: dict) -> tuple:
    return (r["kind"], r["mode"], r["batch"], r["heads"], r["n"], r["d"], r["dtype"], r["hidden"],
            r["rank"])


# ------------------------------------------------------------------------------ environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` with local changes), or ``None`` outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("+dirty" if dirty else "") if sha else None


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(torch.device(device))
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} logical cores)"


def environment(device: str) -> dict:
    """Device, versions and commit: what a result must say to be comparable."""
    from .. import __version__
    from .memory import cpu_memory_method

    versions = {"attnkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "cudnn": None}
    if torch.backends.cudnn.is_available():
        versions["cudnn"] = torch.backends.cudnn.version()
    for dist in ("triton", "transformers", "peft", "flash-attn", "flash-linear-attention"):
        versions[dist] = _version(dist)
    return {
        "device": device, "device_name": device_name(device), "platform": platform.platform(),
        "versions": versions, "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "memory_method": ("torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus "
                          "memory_allocated before the call" if device.startswith("cuda")
                          else cpu_memory_method() + " (in a worker subprocess)"),
        "timing_method": ("triton.testing.do_bench median (L2 flushed between calls)"
                          if device.startswith("cuda") else "time.perf_counter median of warm calls"),
        "argv": sys.argv, "unix_time": time.time(),
    }
