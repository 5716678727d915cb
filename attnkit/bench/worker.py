"""The CPU measuring subprocess: ``python -m attnkit.bench.worker`` (internal).

Reads ``{"points": [...], "options": {...}}`` as JSON on stdin and writes one ``@@ROW {json}`` line
per point on stdout as soon as it is measured (other output from libraries is ignored by the
parent). Running the points in a fresh process keeps the CLI's own memory (progress bar, plots,
earlier points) out of the RSS peaks that ``memory.py`` measures, and a point that gets the
process killed costs only that point.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from .registry import Point
from .runner import ROW_MARKER as MARKER
from .runner import RunOptions, run_points


def main() -> int:
    job = json.load(sys.stdin)
    points = [Point(**p) for p in job["points"]]
    opts = RunOptions(**job.get("options", {}))
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    for row in run_points(points, opts):
        sys.stdout.write(MARKER + json.dumps(row) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised through the sweep
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Every row is written: skip the interpreter's teardown, where triton's nanobind extension
    # prints "leaked N instances/types/functions" reports (measured: ~600 lines per worker.log
    # of a --quick run) that say nothing about the benchmark and bury its real messages.
    os._exit(code)
