"""``attnkit bench --gpu-check``: one prepared call for a short GPU lease, in three phases.

1. **smoke** (:mod:`attnkit.bench.smoke`): every Triton kernel once at a realistic size against
   the torch path, ``smoke.json`` written as it goes (a few seconds each, compiles included);
2. **table**: the headline table (:func:`headline_grid`: dense, causal, window, BigBird, linear,
   LoRA at N = 4k and 16k, D = 128, bf16, fwd and fwd+bwd, against every SDPA backend,
   FlexAttention and the other baselines that are installed), ``rows.jsonl`` as rows arrive;
3. **tests**: the GPU test suite, with what time is left.

Everything shares one deadline (``--check-time`` after the process started). Each phase's budget
comes from :func:`phase_budget`, at the moment the phase starts, so a fast phase leaves its time to
the next ones; a phase with under a second left is recorded as skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace

__all__ = ["PHASES", "phase_budget", "run_phases", "headline_grid", "HEADLINE_KINDS",
           "RESULTS_RESERVE_S", "SMOKE_S", "MIN_TABLE_S", "MIN_TESTS_S"]

#: Seconds kept at the end for writing results, the table and the plots.
RESULTS_RESERVE_S = 30.0
#: The smoke's cap (ten checks of a few seconds each, compiles included).
SMOKE_S = 120.0
#: What the smoke leaves the table and the tests at least (when the deadline allows).
MIN_TABLE_S = 90.0
MIN_TESTS_S = 45.0
#: The phases, in the order they run.
PHASES = ("smoke", "table", "tests")
#: The kinds of the headline table.
HEADLINE_KINDS = ("dense", "causal", "window", "bigbird", "linear", "lora")


def phase_budget(phase: str, deadline: float, now: float, *, table_cap: float | None = None,
                 test_cap: float = 240.0, smoke_cap: float = SMOKE_S) -> float:
    """Seconds ``phase`` may take if it starts at ``now`` (never below 0).

    smoke: ``smoke_cap``, less if the table and the tests would keep under ``MIN_TABLE_S`` and
    ``MIN_TESTS_S``; table: what is left less ``MIN_TESTS_S``, capped by ``table_cap``
    (``--time-budget``); tests: what is left, capped by ``test_cap`` (``--test-timeout``). All
    keep ``RESULTS_RESERVE_S`` before the deadline."""
    left = deadline - now - RESULTS_RESERVE_S
    if phase == "smoke":
        budget = min(smoke_cap, left - MIN_TABLE_S - MIN_TESTS_S)
    elif phase == "table":
        budget = min(table_cap if table_cap is not None else float("inf"), left - MIN_TESTS_S)
    elif phase == "tests":
        budget = min(test_cap, left)
    else:
        raise ValueError(f"unknown --gpu-check phase {phase!r}; the phases are {', '.join(PHASES)}")
    return max(0.0, budget)


def run_phases(phases: list[tuple[str, Callable[[float], dict | None]]], deadline: float,
               clock: Callable[[], float] = time.time, log: Callable[[str], None] = print,
               **caps) -> dict:
    """Run ``phases`` (``(name, fn(budget_s) -> dict)``) in order; ``{name: record}`` with each
    phase's budget, seconds taken and what ``fn`` returned, or ``status: skipped``."""
    done: dict = {}
    for name, fn in phases:
        now = clock()
        budget = phase_budget(name, deadline, now, **caps)
        if budget < 1.0:
            done[name] = {"status": "skipped", "budget_s": round(budget, 1),
                          "reason": f"{deadline - now:.0f} s were left before --check-time's end"}
            log(f"--gpu-check: {name}: skipped ({done[name]['reason']})")
            continue
        log(f"--gpu-check: {name} (budget {budget:.0f} s) ...")
        result = fn(budget) or {}
        done[name] = {"status": "ran", "budget_s": round(budget, 1),
                      "seconds": round(clock() - now, 1), **result}
    return done


def headline_grid(device: str = "cuda"):
    """The headline table's grid: N = 4k and 16k, D = 128, bf16, fwd and fwd+bwd."""
    from .sweep import gpu_grid

    return replace(gpu_grid(device), kinds=HEADLINE_KINDS, ns=(4096, 16384), ds=(128,),
                   modes=("fwd", "fwd+bwd"))
