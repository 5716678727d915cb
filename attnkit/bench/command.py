"""``attnkit bench``: the sweep a new user runs first, ``--gpu-check`` for a short GPU lease
(:mod:`.gpu_check`) and ``--host-overhead`` (:mod:`.host_overhead`).

Order of work: measure, write ``rows.jsonl`` as rows arrive (a killed run keeps what it measured),
then ``results.json``, ``results.csv`` and ``summary.txt``, then the plots (which need matplotlib;
without it they are skipped with one message).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from ..kernels.autotune import ENV as AUTOTUNE_ENV
from .flops import MODES
from .gpu_check import RESULTS_RESERVE_S  # noqa: F401  (re-exported: --gpu-check's reserve)
from .memory import available_cpu_memory
from .registry import DTYPES, KINDS
from .report import (
    format_table,
    print_table,
    series_slopes,
    skip_reasons,
    skipped_baselines,
    write_csv,
    write_json,
    write_plots,
)
from .runner import RunOptions
from .sweep import build_points, environment, grid_for, run_sweep

__all__ = ["add_arguments", "run", "run_test_suite", "process_start_time", "failed_attnkit_rows"]

_IMPORTED_AT = time.time()
#: ``/proc``'s start time is trusted only if it is at most this long before this module's import.
MAX_STARTUP_S = 120.0


def process_start_time() -> float:
    """When this process started (``time.time()`` scale): from ``/proc`` on Linux, else when this
    module was imported."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        start = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return _IMPORTED_AT
    if start < _IMPORTED_AT - MAX_STARTUP_S:
        # Python takes seconds, not minutes, to get here: a boot time that disagrees with the
        # process clock (seen in some containers) would put the deadline in the past.
        return _IMPORTED_AT
    return min(start, _IMPORTED_AT)


def failed_attnkit_rows(rows: list[dict]) -> list[dict]:
    """Rows of attnkit's own implementations (not baselines) whose status is ``error``."""
    return [r for r in rows if not r["baseline"] and r["status"] == "error"]


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choice_list(choices) -> callable:
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [v for v in values if v not in choices()]
        if not values or bad:
            raise argparse.ArgumentTypeError(
                f"unknown value(s) {', '.join(bad) or repr(text)}; choose from {', '.join(choices())}")
        return values
    return parse


def _positive(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _all_impls() -> list[str]:
    return list(dict.fromkeys(i for k in KINDS.values() for i in k.impls))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` sub-command's options."""
    p.add_argument("--out", type=Path, default=Path("bench-out"),
                   help="folder for results.json, results.csv, summary.txt and plots (default: bench-out)")
    p.add_argument("--quick", action="store_true",
                   help="a small grid: under a minute on a 2-core CPU, a few minutes on a GPU")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to run (auto: the GPU if one is visible, else the CPU with the torch backend)")
    p.add_argument("--kinds", type=_choice_list(lambda: list(KINDS)), default=None,
                   help="comma-separated kinds (default: all): " + ", ".join(KINDS))
    p.add_argument("--impls", type=_choice_list(_all_impls), default=None,
                   help="comma-separated implementations (default: all): " + ", ".join(_all_impls()))
    p.add_argument("--modes", type=_choice_list(lambda: list(MODES)), default=None,
                   help="comma-separated: fwd, bwd, fwd+bwd (default: fwd,fwd+bwd; --quick on a CPU: fwd)")
    p.add_argument("--n", type=_int_list, default=None, help="sequence lengths, e.g. 512,1024,2048")
    p.add_argument("--d", type=_int_list, default=None, help="head dims, e.g. 64,128")
    p.add_argument("--batch", type=int, default=None, help="batch size")
    p.add_argument("--heads", type=int, default=None, help="attention heads")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--time-budget", type=_positive, default=None, metavar="SECONDS",
                   help="stop measuring after this long; the remaining points are recorded as skipped")
    p.add_argument("--slow", type=_positive, default=None, metavar="SECONDS",
                   help="after a point this slow, skip larger N of its line (default: CPU 2, GPU 10)")
    p.add_argument("--point-time", type=_positive, default=None, metavar="SECONDS",
                   help="CPU: time each point for about this long, at least 3 calls (default: 0.3 with "
                        "--quick, else 0.6); GPU: do_bench's rep time (default 0.1)")
    p.add_argument("--cpu-mem-cap", type=_positive, default=None, metavar="GIB",
                   help="CPU points predicted to need more are recorded as oom without running "
                        "(default: half the available memory)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU: torch threads in the measuring subprocess (default 1: stable medians on a "
                        "shared machine; 0 = torch's default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--gpu-check", action="store_true",
                   help="on a GPU, within --check-time: a correctness smoke of every kernel "
                        "(OUT/smoke.json), the headline table (N 4k and 16k, D 128, bf16), then the "
                        "test suite with the time left (OUT/tests.log); ATTNKIT_AUTOTUNE=0 unless set")
    p.add_argument("--host-overhead", action="store_true",
                   help="time the host (Python) cost of attnkit.attention's Triton path layer by "
                        "layer, kernel launches stubbed (CPU, no GPU); OUT/host_overhead.json")
    p.add_argument("--test-args", default="-n 4 tests",
                   help="pytest arguments for --gpu-check (default: '-n 4 tests'; no -n without xdist)")
    p.add_argument("--test-timeout", type=_positive, default=240.0, metavar="SECONDS",
                   help="--gpu-check: stop the test suite after this long (default 240; it gets "
                        "at most what the smoke and the table leave)")
    p.add_argument("--check-time", type=_positive, default=420.0, metavar="SECONDS",
                   help="--gpu-check: finish everything this long after the process started "
                        "(default 420: a GPU session has 15 minutes of device time in all, start-up "
                        "included, so one call gets about 7); each phase gets what the earlier ones "
                        "leave, less 30 s for writing the results; --time-budget caps the table")


def _resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False)")
    return choice


def run_test_suite(out_dir: Path, test_args: str, timeout_s: float) -> dict:
    """Run pytest in a subprocess, output to ``out_dir/tests.log`` and ``tests.xml``; a summary dict.

    pytest runs in a session of its own; on timeout the whole process group is killed, so
    pytest-xdist's workers do not outlive it. Unless the caller's environment says otherwise it
    runs with ``ATTNKIT_AUTOTUNE=0`` (:mod:`attnkit.kernels.autotune`): the tests then check the
    tiles the compile tests measure, and no minutes go to benchmarking alternatives per worker."""
    args = shlex.split(test_args)
    if importlib.util.find_spec("xdist") is None and "-n" in args:
        i = args.index("-n")
        del args[i:i + 2]  # pytest-xdist is missing: run serially
    cmd = [sys.executable, "-m", "pytest", *args, "-q", "-ra", f"--junitxml={out_dir / 'tests.xml'}"]
    t0 = time.time()
    with open(out_dir / "tests.log", "w") as log:
        env = {**os.environ}
        env.setdefault(AUTOTUNE_ENV, "0")
        log.write(f"# {AUTOTUNE_ENV}={env[AUTOTUNE_ENV]}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            _kill_group(proc)
    text = (out_dir / "tests.log").read_text(errors="replace").strip().splitlines()
    summary = text[-1] if text else ""
    if rc is None:
        summary = f"timed out after {timeout_s:g} s; last line: {summary}"
    return {"command": " ".join(map(shlex.quote, cmd)), "returncode": rc, "summary": summary,
            "env": {AUTOTUNE_ENV: env[AUTOTUNE_ENV]},
            "seconds": round(time.time() - t0, 1), "log": "tests.log", "junit": "tests.xml"}


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc``'s process group (its own session) and reap ``proc``; a no-op once all exited."""
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    elif proc.poll() is None:
        proc.kill()
    proc.wait()


def _grid(args, device: str, base=None):
    grid = base if base is not None else grid_for(device, args.quick)
    overrides = {"kinds": args.kinds, "impls": args.impls, "modes": args.modes, "ns": args.n,
                 "ds": args.d, "batch": args.batch, "heads": args.heads, "dtype": args.dtype}
    return replace(grid, **{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    """Run ``attnkit bench`` with parsed arguments; returns the exit code."""
    if getattr(args, "host_overhead", False):
        return _host_overhead(args)
    device = _resolve_device(args.device)
    if args.gpu_check and not device.startswith("cuda"):
        print("attnkit bench --gpu-check needs a CUDA GPU, and none is visible here.\n"
              "On the CPU run the tests with `python -m pytest -n 2` and the sweep with "
              "`attnkit bench --quick`.", file=sys.stderr)
        return 2
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    for name in ("batch", "heads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is an existing file; --out must be a folder (new or "
                         "existing) for results.json, results.csv, summary.txt and the plots")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a parent is a file, no permission, ...
        raise ValueError(f"--out {str(out)!r} cannot be created: {e.strerror}") from None
    meta = environment(device)
    if args.gpu_check:
        return _gpu_check(args, device, out, meta)
    rows, exit_code = _sweep(args, _grid(args, device), device, out, meta, args.time_budget)
    return exit_code


def _gpu_check(args: argparse.Namespace, device: str, out: Path, meta: dict) -> int:
    """``--gpu-check``: smoke, headline table, tests (:mod:`attnkit.bench.gpu_check`), in one
    deadline. Autotuning is off unless the caller's environment says otherwise: the table then
    times each kernel's first tile, the one the compile tests check (autotuning every key would
    cost more compiles than a lease has minutes)."""
    from .gpu_check import headline_grid, run_phases
    from .smoke import run_smoke

    deadline = process_start_time() + args.check_time
    os.environ.setdefault(AUTOTUNE_ENV, "0")
    meta.update(check_time_s=args.check_time, autotune_env={AUTOTUNE_ENV: os.environ[AUTOTUNE_ENV]})
    grid = _grid(args, device, headline_grid(device))
    state: dict = {"rows": [], "exit": 0}

    def smoke(budget: float) -> dict:
        doc = run_smoke(out / "smoke.json", time.time() + budget, device=device)
        if doc["counts"]["fail"] or doc["counts"]["error"]:
            state["exit"] = 1
        return {"counts": doc["counts"], "file": "smoke.json"}

    def table(budget: float) -> dict:
        state["rows"], code = _sweep(args, grid, device, out, meta, budget)
        state["exit"] |= code
        return {"rows": len(state["rows"])}

    def tests(budget: float) -> dict:
        suite = meta["test_suite"] = run_test_suite(out, args.test_args, budget)
        print(f"tests: {suite['summary']} (exit code {suite['returncode']}, {suite['seconds']} s; "
              f"log in {out / 'tests.log'})", flush=True)
        if suite["returncode"] != 0:
            state["exit"] = 1
        return {"returncode": suite["returncode"], "summary": suite["summary"]}

    meta["phases"] = run_phases([("smoke", smoke), ("table", table), ("tests", tests)], deadline,
                                log=lambda m: print(m, flush=True), table_cap=args.time_budget,
                                test_cap=args.test_timeout)
    _write_results(out, meta, grid, state["rows"])  # again, now with the smoke and the tests
    return state["exit"]


def _write_results(out: Path, meta: dict, grid, rows: list[dict]) -> None:
    write_json(out / "results.json", meta, dict(asdict(grid).items()), rows)
    write_csv(out / "results.csv", rows, meta)
    (out / "summary.txt").write_text(_summary(meta, rows) + "\n")


def _sweep(args: argparse.Namespace, grid, device: str, out: Path, meta: dict,
           budget: float | None) -> tuple[list[dict], int]:
    """Measure ``grid``'s points (``rows.jsonl`` as they arrive), then write results.json,
    results.csv, summary.txt and the plots; ``(rows, exit code)``."""
    exit_code = 0
    on_cuda = device.startswith("cuda")
    cap = None
    if not on_cuda:
        avail = available_cpu_memory()
        cap = args.cpu_mem_cap * 2**30 if args.cpu_mem_cap else (avail / 2 if avail else None)
    opts = RunOptions(
        mem_cap_bytes=cap, deadline=time.time() + budget if budget is not None else None,
        slow_s=args.slow if args.slow else (10.0 if on_cuda else 2.0),
        cpu_budget_s=args.point_time or (0.3 if args.quick else 0.6),
        rep_ms=(args.point_time or 0.1) * 1e3, threads=0 if on_cuda else args.threads, freeze_gc=True,
    )
    points = build_points(grid)
    meta.update(quick=bool(args.quick), gpu_check=bool(args.gpu_check),
                check_time_s=args.check_time if args.gpu_check else None,
                cpu_mem_cap_bytes=cap, time_budget_s=budget, slow_s=opts.slow_s,
                cpu_threads=None if on_cuda else (args.threads or torch.get_num_threads()))
    print(f"attnkit bench: {len(points)} points on {meta['device_name']} ({grid.dtype}); writing to {out}",
          flush=True)
    from .progress import progress_bar

    bar = progress_bar(len(points), enabled=not args.no_progress)
    jsonl = open(out / "rows.jsonl", "w")  # noqa: SIM115 - closed below, written as rows arrive

    def on_row(row: dict) -> None:
        jsonl.write(json.dumps(row) + "\n")
        jsonl.flush()
        shape = f"D{row['d']}" if row["d"] else f"h{row['hidden']}"
        bar.update(f"{row['kind']} {row['impl']} {row['mode']} {shape} N={row['n']}: {row['status']}")

    t0 = time.time()
    try:
        rows = run_sweep(points, opts, on_row=on_row, log_path=out / "worker.log")
    finally:
        bar.close()
        jsonl.close()
    meta["sweep_seconds"] = round(time.time() - t0, 1)
    _write_results(out, meta, grid, rows)
    print_table(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "oom", "skipped", "error")}
    print("rows: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f" in {meta['sweep_seconds']} s")
    if not args.no_plots:
        plots = write_plots(out, rows)
        if isinstance(plots, str):
            print(f"note: {plots}")
        else:
            print("plots: " + ", ".join(str(p) for p in plots))
    print(f"results: {out / 'results.json'}, {out / 'results.csv'}, {out / 'summary.txt'}")
    if rows and counts["ok"] == 0:
        print("attnkit bench: nothing was measured; every point was skipped or failed:",
              file=sys.stderr)
        for line in skip_reasons(rows)[:20]:
            print(f"  {line}", file=sys.stderr)
        exit_code = 1
    elif not rows:
        print("attnkit bench: the grid has no points (check --kinds/--n/--modes)", file=sys.stderr)
        exit_code = 1
    failed = failed_attnkit_rows(rows)
    if args.gpu_check and failed:
        print(f"--gpu-check: {len(failed)} attnkit point(s) failed (status error; see summary.txt)",
              file=sys.stderr)
        exit_code = 1
    return rows, exit_code


def _host_overhead(args: argparse.Namespace) -> int:
    """``--host-overhead``: :mod:`attnkit.bench.host_overhead`, printed and in OUT."""
    from .host_overhead import format_report, measure

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("attnkit bench --host-overhead: unset TRITON_INTERPRET (the interpreter takes other "
              "launch paths)", file=sys.stderr)
        return 2
    result = measure(calls=200 if args.quick else 1000)
    print(format_report(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host_overhead.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {args.out / 'host_overhead.json'}")
    return 0


def _summary(meta: dict, rows: list[dict]) -> str:
    lines = [f"device: {meta['device_name']}", f"commit: {meta['git_commit']}",
             f"torch {meta['versions']['torch']}, triton {meta['versions']['triton']}", ""]
    for name, phase in meta.get("phases", {}).items():  # --gpu-check
        what = phase.get("reason") or phase.get("summary") or phase.get("counts") or phase.get("rows")
        lines.append(f"{name}: {phase['status']}, {phase.get('seconds', 0)} s of "
                     f"{phase['budget_s']} s: {what}")
    if "test_suite" in meta:
        lines += [f"tests: {meta['test_suite']['summary']}", ""]
    lines += [format_table(rows), "",
              "fitted log-log slopes vs N (upper half of N, at least 3 points; the design "
              "expects time ~2 for dense and causal, ~1 for the rest):"]
    for s in series_slopes(rows):
        t = "-" if s["time_slope"] is None else f"{s['time_slope']:.2f}"
        m = "-" if s["memory_slope"] is None else f"{s['memory_slope']:.2f}"
        expected = f"{KINDS[s['kind']].expected_slope:g}" if s["kind"] in KINDS else "?"
        shape = f"D{s['d']}" if s["d"] else f"h{s['hidden']} r{s['rank']}"  # LoRA: no head dim
        lines.append(f"  {s['kind']:<10} {s['impl']:<16} {s['mode']:<8} {shape:<9} "
                     f"time {t:>5}  memory {m:>5}  (expected time ~{expected})")
    skipped = skipped_baselines(rows)
    if skipped:
        lines += ["", "baselines skipped (not in the table):"] + [f"  {x}" for x in skipped]
    if rows and not any(r["status"] == "ok" for r in rows):
        lines += ["", "NOTHING WAS MEASURED; why each row did not run:"]
        lines += [f"  {x}" for x in skip_reasons(rows)]
    problems = [r for r in rows if r["status"] in ("error", "oom")]
    if problems:
        lines += ["", "not measured:"]
        lines += [f"  {r['kind']} {r['impl']} {r['mode']} N={r['n']}: {r['status']}: {r['reason']}"
                  for r in problems]
    return "\n".join(lines)
