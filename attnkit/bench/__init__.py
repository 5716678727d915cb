"""The benchmark harness shared by ``benchmarks/`` (pytest-benchmark) and ``attnkit bench``.

* ``registry.py``: kinds, implementations and points; ``kinds/`` registers them (one module per op);
* ``flops.py``: FLOP and byte counts (flash-attention's convention);
* ``timing.py`` / ``memory.py``: medians and measured peak memory on CUDA and the CPU;
* ``runner.py``: one point -> one row (``ok``/``oom``/``skipped``/``error``), never a crash;
* ``sweep.py``: grids, worker subprocesses on the CPU, environment record, speed-ups;
* ``report.py``: results.json, CSV, the table, log-log plots with fitted slopes;
* ``command.py``: the ``attnkit bench`` sub-command.
"""

from __future__ import annotations

from . import kinds as _kinds  # noqa: F401  (registers the built-in kinds)
from .flops import MODE_FACTOR, MODES, attention_flops, linear_attention_flops, lora_flops
from .registry import KINDS, Impl, Kind, Point, Unavailable, Workload, register_impl, register_kind
from .report import fit_loglog_slope
from .runner import RunOptions, run_point, run_points
from .sweep import Grid, build_points, grid_for, run_sweep

__all__ = [
    "MODES", "MODE_FACTOR", "attention_flops", "linear_attention_flops", "lora_flops", "KINDS", "Impl",
    "Kind", "Point", "Unavailable", "Workload", "register_impl", "register_kind", "fit_loglog_slope",
    "RunOptions", "run_point", "run_points", "Grid", "build_points", "grid_for", "run_sweep",
]
