"""Reporting: results.json, results.csv, the terminal table and the log-log plots.

Slopes: time (or memory) against N on log-log axes is a line whose slope is the exponent of N,
so dense attention reads ~2 and sliding window, linear attention and LoRA ~1. Small N is often
launch- or overhead-bound (flat), so the fit uses the upper half of the N range measured for
each line, and never fewer than three points (a two-point "slope" flipped between 1.0 and 2.0
across repeated CPU runs; with fewer than three points a line has no slope).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

__all__ = ["SCHEMA", "fit_loglog_slope", "series_slopes", "write_json", "write_csv", "format_table",
           "write_plots", "CSV_FIELDS", "skipped_baselines", "skip_reasons", "MIN_SLOPE_POINTS"]

SCHEMA = "attnkit-bench/1"
CSV_FIELDS = [
    "kind", "op", "impl", "baseline", "mode", "batch", "heads", "n", "d", "hidden", "rank", "dtype",
    "device", "status", "reason", "time_ms", "time_ms_p20", "time_ms_p80", "reps", "flops", "tflops",
    "bytes", "gbps", "peak_mem_bytes", "speedup", "best_baseline",
]


#: Fewest points a slope is fitted on.
MIN_SLOPE_POINTS = 3


def fit_loglog_slope(ns: Sequence[float], ys: Sequence[float], upper_half: bool = True) -> float | None:
    """Least-squares slope of ``log y`` against ``log n`` (``None`` with < 3 usable points).

    With ``upper_half`` only points with ``n`` at or above the median of the measured ``n`` are
    used (never fewer than three: the three largest).
    """
    pts = sorted((float(n), float(y)) for n, y in zip(ns, ys, strict=True)
                 if n and y and n > 0 and y > 0 and math.isfinite(y))
    if len(pts) < MIN_SLOPE_POINTS:
        return None
    if upper_half:
        pts = pts[min(len(pts) // 2, len(pts) - MIN_SLOPE_POINTS):]
    xs = [math.log(n) for n, _ in pts]
    ls = [math.log(y) for _, y in pts]
    mx, my = sum(xs) / len(xs), sum(ls) / len(ls)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ls, strict=True)) / sxx


def _series_key(r: dict) -> tuple:
    return (r["kind"], r["impl"], r["mode"], r["d"], r["dtype"])


def series_slopes(rows: list[dict]) -> list[dict]:
    """One entry per line (kind, impl, mode, D): slopes of time and peak memory against N."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault(_series_key(r), []).append(r)
    out = []
    for (kind, impl, mode, d, dtype), rs in groups.items():
        ns = [r["n"] for r in rs]
        out.append({
            "kind": kind, "impl": impl, "mode": mode, "d": d, "dtype": dtype, "points": len(rs),
            "hidden": rs[0].get("hidden", 0), "rank": rs[0].get("rank", 0),
            "time_slope": fit_loglog_slope(ns, [r["time_ms"] for r in rs]),
            "memory_slope": fit_loglog_slope(ns, [r["peak_mem_bytes"] or 0 for r in rs]),
        })
    return out


def write_json(path: Path, meta: dict, grid: dict, rows: list[dict]) -> None:
    doc = {"schema": SCHEMA, "meta": meta, "grid": grid, "slopes": series_slopes(rows), "rows": rows}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def write_csv(path: Path, rows: list[dict], meta: dict) -> None:
    """One long CSV, one row per point (the device and commit repeated, so files concatenate)."""
    fields = [*CSV_FIELDS, "device_name", "git_commit"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "device_name": meta.get("device_name"), "git_commit": meta.get("git_commit")})


def _fmt(x: float | None, spec: str, unit: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{unit}"


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _point_key(r: dict) -> tuple:
    return (r["kind"], r["mode"], r["d"], r.get("hidden", 0), r.get("rank", 0), r["dtype"], r["n"])


def _ratio(num, den) -> str:
    return "-" if not num or not den else f"{num / den:.2f}x"


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Table cells: per point, attnkit's rows then the baselines that ran (or failed) there.

    ``speed-up`` = baseline time / attnkit time and ``mem ratio`` = baseline peak / attnkit peak
    (above 1: attnkit is faster / smaller). On an attnkit row both compare with the fastest
    baseline; on a baseline row, with the point's first attnkit row. Baselines skipped at a point
    are left out here (:func:`skipped_baselines` lists them once each, with the reason).
    """
    points: dict[tuple, list[dict]] = {}
    for r in rows:
        points.setdefault(_point_key(r), []).append(r)
    out = []
    for group in points.values():
        ours = [r for r in group if not r["baseline"]]
        ref = next((r for r in ours if r["status"] == "ok"), None)
        shown = ours + [r for r in group if r["baseline"] and r["status"] != "skipped"]
        for r in shown:
            if r["status"] == "ok":
                if not r["baseline"]:
                    best = next((b for b in group if b["baseline"] and b["status"] == "ok"
                                 and b["impl"] == r.get("best_baseline")), None)
                    vs = "-" if best is None else f"vs {best['impl']}"
                    speed = "-" if r["speedup"] is None else f"{r['speedup']:.2f}x"
                    mem = "-" if best is None else _ratio(best["peak_mem_bytes"],
                                                          r["peak_mem_bytes"])
                else:
                    vs, speed = "", "-" if ref is None else _ratio(r["time_ms"], ref["time_ms"])
                    mem = "-" if ref is None else _ratio(r["peak_mem_bytes"],
                                                         ref["peak_mem_bytes"])
                cells = [_fmt(r["time_ms"], ".3f"), _fmt(r["tflops"], ".3f"),
                         _mib(r["peak_mem_bytes"]), speed, mem, vs]
            else:
                cells = [r["status"], "", "", "", "", (r["reason"] or "")[:60]]
            shape = f"D{r['d']}" if r["d"] else f"h{r['hidden']} r{r['rank']}"
            impl = r["impl"] if not r["baseline"] else f"  {r['impl']}"
            out.append([r["kind"], impl, r["mode"], shape, str(r["n"]), *cells])
    return out


def skipped_baselines(rows: list[dict]) -> list[str]:
    """One line per (baseline, reason) skipped somewhere, with how many points it missed."""
    seen: dict[tuple, int] = {}
    for r in rows:
        if r["baseline"] and r["status"] == "skipped":
            key = (r["impl"], r["reason"] or "")
            seen[key] = seen.get(key, 0) + 1
    return [f"{impl}: {reason} ({n} point{'s' * (n != 1)})" for (impl, reason), n in seen.items()]


def skip_reasons(rows: list[dict]) -> list[str]:
    """Why nothing ran: each distinct (impl, reason) of the rows that did not run."""
    return list(dict.fromkeys(f"{r['impl']}: {r['status']}: {r['reason'] or 'no reason given'}"
                              for r in rows if r["status"] != "ok"))


TABLE_HEADER = ["kind", "impl", "mode", "shape", "N", "time ms", "TFLOP/s", "peak MiB",
                "speed-up", "mem ratio", "baseline / note"]


def format_table(rows: list[dict]) -> str:
    """A plain-text table (used when rich is missing, and in summary.txt)."""
    body = table_rows(rows)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h)
              for i, h in enumerate(TABLE_HEADER)]
    last = len(TABLE_HEADER) - 1
    line = lambda cells: "  ".join(c.rjust(w) if 4 <= i < last else c.ljust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([line(TABLE_HEADER), line(["-" * w for w in widths]), *map(line, body)])


def print_table(rows: list[dict]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(format_table(rows))
        return
    t = Table(title="attnkit bench: speed-up = baseline time / attnkit time, mem ratio = baseline "
                    "peak / attnkit peak (same point; > 1: attnkit better)")
    for i, h in enumerate(TABLE_HEADER):
        t.add_column(h, justify="right" if 4 <= i < len(TABLE_HEADER) - 1 else "left")
    for cells in table_rows(rows):
        t.add_row(*cells)
    console = Console()
    if not console.is_terminal:  # a pipe or a log: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(t)


# ----------------------------------------------------------------------------------- plots


def write_plots(out_dir: Path, rows: list[dict]) -> list[Path] | str:
    """``time_<mode>.png`` and ``memory_<mode>.png``: log-log against N, a panel per head dim
    (LoRA in its own panel), a line per kind and implementation with its fitted slope.

    Returns the files written, or the reason no plot was written (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): plots skipped"
    ok = [r for r in rows if r["status"] == "ok"]
    written = []
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    styles = ["-", "--", ":", "-.", (0, (3, 1, 1, 1)), (0, (5, 2)), (0, (1, 1)), (0, (4, 1, 1, 1, 1, 1))]
    markers = "os^vDP*Xh"
    for mode in dict.fromkeys(r["mode"] for r in rows):
        panels = sorted({r["d"] for r in ok if r["mode"] == mode}, key=lambda d: (d == 0, d))  # LoRA last
        if not panels:
            continue
        for metric, key, label in (("time", "time_ms", "time per call (ms)"),
                                   ("memory", "peak_mem_bytes", "peak memory above inputs (MiB)")):
            fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.2), squeeze=False)
            for ax, d in zip(axes[0], panels, strict=True):
                sel = [r for r in ok if r["mode"] == mode and r["d"] == d and r[key]]
                impls = list(dict.fromkeys(r["impl"] for r in sel))
                for (kind, impl), rs in _group(sel).items():
                    rs.sort(key=lambda r: r["n"])
                    ns = [r["n"] for r in rs]
                    ys = [r[key] / (2**20 if metric == "memory" else 1) for r in rs]
                    slope = fit_loglog_slope(ns, ys)
                    i = impls.index(impl)
                    ax.plot(ns, ys, color=colors[kind], linestyle=styles[i % len(styles)],
                            marker=markers[i % len(markers)], markersize=4,
                            linewidth=2.2 if impl.startswith("attnkit") else 1.2,
                            label=f"{kind} · {impl}" + ("" if slope is None else f" (slope {slope:.2f})"))
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("sequence length N (LoRA: tokens per batch row)")
                ax.set_ylabel(label)
                sample = sel[0] if sel else {}
                title = (f"head dim {d}" if d else f"LoRA hidden {sample.get('hidden')} rank "
                         f"{sample.get('rank')}")
                ax.set_title(f"{metric} vs N, {mode}, {title}, {sample.get('dtype', '')}", fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                lines = len(_group(sel))
                # below the axes, never on them: a legend inside hid the small-N points
                ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                          ncol=2 if lines > 6 else 1, frameon=False)
            fig.tight_layout()
            path = out_dir / f"{metric}_{mode.replace('+', '_')}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def _group(rows: list[dict]) -> dict[tuple, list[dict]]:
    g: dict[tuple, list[dict]] = {}
    for r in rows:
        g.setdefault((r["kind"], r["impl"]), []).append(r)
    return g
