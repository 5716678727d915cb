"""The compile report: one record per captured (kernel, tile, head dim, dtype, flags) config.

:func:`collect` drives the public-API cases (:mod:`.workload`) under capture, turns every config
the autotuners are offered (after Triton's own prune) into a compile job, compiles each distinct
job once (a run-local cache keyed by the job: kernel, signature, constexprs, attributes, options,
arch) and returns records with the cubin's numbers. Filters are applied before compiling, so
``first_only`` (only what ``ATTNKIT_AUTOTUNE=0`` runs) and a kernel/head-dim/dtype filter are the
fast paths; a compile takes 1-5 s on one core (measured: flash at D = 128, bf16, sm_90).
"""

from __future__ import annotations

import os

from .capture import Launch
from .compile import SHARED_LIMIT, Job, compile_job, job_for
from .workload import capture_cases, cases


def _flags(launch: Launch) -> list[str]:
    """The launch's boolean constexprs that are on (HAS_KPM, VARLEN, SPARSE, CAUSAL, ...)."""
    return sorted(p.name for p in launch.fn.params
                  if p.is_constexpr and launch.args.get(p.name) is True)


def _modes(launch: Launch) -> dict:
    """The launch's string constexprs (``PRECISION``: ``"tf32"`` or ``"ieee"`` for fp32 dots)."""
    return {p.name: launch.args[p.name] for p in launch.fn.params
            if p.is_constexpr and isinstance(launch.args.get(p.name), str)}


def _tile(launch: Launch) -> dict:
    """The autotuner config's values; for a plain launch its int ``BLOCK*`` constexprs."""
    if launch.tuned:
        return dict(launch.config)
    return {p.name: launch.args[p.name] for p in launch.fn.params
            if p.is_constexpr and p.name.startswith("BLOCK")
            and isinstance(launch.args.get(p.name), int)
            and not isinstance(launch.args.get(p.name), bool)}


def record(launch: Launch, arch: int) -> dict:
    """The report fields of ``launch`` known before compiling."""
    tile = _tile(launch)
    return dict(
        kernel=launch.kernel.removesuffix("[tuned]"), tuned=launch.tuned, arch=arch, tile=tile,
        block_m=tile.get("BLOCK_M"), block_n=tile.get("BLOCK_N"), num_warps=launch.num_warps,
        num_stages=launch.num_stages, head_dim=launch.case.get("head_dim"),
        dtype=launch.case.get("dtype"), op=launch.case.get("op"), case=launch.case.get("case"),
        flags=_flags(launch), modes=_modes(launch), first=launch.first)


def _compile_all(jobs: list[Job], workers: int) -> dict:
    if workers <= 1 or len(jobs) <= 1:
        return {job: compile_job(job) for job in jobs}
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        return dict(zip(jobs, pool.map(compile_job, jobs), strict=True))


def default_workers() -> int:
    """Half the cores (compiles are single-threaded; leave room for the rest of the machine),
    1 on the 2-core CI machines."""
    return max(1, (os.cpu_count() or 1) // 2) if (os.cpu_count() or 1) > 2 else 1


def collect(arch: int = 90, ops=None, kernels=None, head_dims=None, dtypes=None,
            first_only: bool = False, cases_filter=None, flags=None,
            workers: int | None = None) -> list[dict]:
    """Capture, filter, compile: the report's records, each with ``registers``, ``spill_bytes``,
    ``shared_bytes``, ``fits`` and the SASS counts added. ``kernels``: substrings of the kernel
    label (``"flash.kernels_fwd:_fwd_kernel"``); ``cases_filter``: case names to keep; ``flags``: a
    set of flag names a record must have exactly (``frozenset()`` = none on)."""
    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch {arch}: accepted are {sorted(SHARED_LIMIT)}")
    selected = cases(ops, head_dims, dtypes)
    if cases_filter is not None:
        selected = [c for c in selected if c.name in cases_filter]
    rec = capture_cases(selected)
    if rec.problems:
        raise RuntimeError("capturing the launches failed:\n" + "\n".join(rec.problems))
    rows, seen = [], set()
    for launch in rec.launches:
        if first_only and not launch.first:
            continue
        if kernels and not any(k in launch.kernel for k in kernels):
            continue
        row = record(launch, arch)
        if flags is not None and set(row["flags"]) != set(flags):
            continue
        job = job_for(launch, arch)
        key = (job, row["kernel"], str(row["tile"]), row["head_dim"], row["dtype"],
               tuple(row["flags"]), str(row["modes"]))
        if key in seen:  # the same config from another case (e.g. the causal part of a window)
            continue
        seen.add(key)
        rows.append((row, job))
    usage = _compile_all(list(dict.fromkeys(job for _, job in rows)),
                         default_workers() if workers is None else workers)
    out = []
    for row, job in rows:
        u = usage[job].as_dict()
        out.append({**row, **u, "fits": u["shared_bytes"] <= SHARED_LIMIT[arch]})
    return out


def table(records: list[dict]) -> str:
    """A fixed-width table of ``records`` (one line each)."""
    head = ("kernel", "case", "tile", "w", "s", "D", "dtype", "flags", "modes", "1st", "regs", "spill",
            "smem", "hgmma", "hmma", "tma", "cp.async")
    lines = []
    for r in records:
        tile = "x".join(str(v) for v in r["tile"].values()) or "-"
        lines.append((r["kernel"], r["case"], tile, r["num_warps"], r["num_stages"], r["head_dim"],
                      r["dtype"], ",".join(r["flags"]) or "-",
                      ",".join(f"{k}={v}" for k, v in r["modes"].items()) or "-",
                      "*" if r["first"] else "",
                      r["registers"], r["spill_bytes"], f"{r['shared_bytes'] / 1024:.0f}K",
                      r["hgmma"], r["hmma"], r["tma_loads"], r["cp_async"]))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, row)) for row in (head, *lines))
