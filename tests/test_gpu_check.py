"""``attnkit bench --gpu-check``'s plan (smoke, headline table, tests, in one deadline) with an
injected clock, and the smoke's runner and comparison; two real smoke checks run on the CPU through
the Triton interpreter (the rest run the same code at other shapes)."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.bench import gpu_check, smoke
from attnkit.bench.gpu_check import (
    MIN_TABLE_S,
    MIN_TESTS_S,
    RESULTS_RESERVE_S,
    SMOKE_S,
    headline_grid,
    phase_budget,
    run_phases,
)
from tests.conftest import DEVICE


class Clock:
    """A clock that each phase advances by the seconds it 'takes'."""

    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_phases_run_in_order_and_share_one_deadline():
    clock, deadline = Clock(), 1000.0 + 420
    calls = []

    def phase(name, takes):
        def fn(budget):
            calls.append((name, budget))
            clock.t += min(takes, budget)
            return {"did": name}
        return fn

    done = run_phases([("smoke", phase("smoke", 80)), ("table", phase("table", 500)),
                       ("tests", phase("tests", 500))], deadline, clock=clock, log=lambda m: None,
                      test_cap=240.0)
    assert [c[0] for c in calls] == ["smoke", "table", "tests"]
    left = 420 - RESULTS_RESERVE_S
    assert calls[0][1] == min(SMOKE_S, left - MIN_TABLE_S - MIN_TESTS_S)
    assert calls[1][1] == left - 80 - MIN_TESTS_S  # the smoke's unused time goes to the table
    assert calls[2][1] == MIN_TESTS_S  # the tests get what is left
    assert done["smoke"] == {"status": "ran", "budget_s": calls[0][1], "seconds": 80, "did": "smoke"}
    assert clock.t <= deadline - RESULTS_RESERVE_S


def test_a_late_or_slow_run_skips_what_no_longer_fits():
    clock, deadline = Clock(), 1000.0 + 100  # started late: 100 s left
    ran = []
    done = run_phases([(n, lambda b, n=n: ran.append((n, b))) for n in ("smoke", "table", "tests")],
                      deadline, clock=clock, log=lambda m: None, table_cap=10.0)
    assert done["smoke"]["status"] == "skipped" and "100 s were left" in done["smoke"]["reason"]
    assert ran == [("table", 10.0), ("tests", 70.0)]  # --time-budget caps the table
    clock.t = deadline - RESULTS_RESERVE_S  # nothing left: every phase is skipped
    assert all(phase_budget(p, deadline, clock.t) == 0.0 for p in gpu_check.PHASES)
    with pytest.raises(ValueError, match="unknown --gpu-check phase 'sweep'"):
        phase_budget("sweep", deadline, clock.t)


def test_headline_grid():
    g = headline_grid("cuda")
    assert g.kinds == ("dense", "causal", "window", "bigbird", "linear", "lora")
    assert (g.ns, g.ds, g.modes, g.dtype) == ((4096, 16384), (128,), ("fwd", "fwd+bwd"), "bfloat16")


def test_smoke_runner_writes_as_it_goes_and_records_failures(tmp_path):
    path, clock = tmp_path / "smoke.json", Clock()
    seen_on_disk = []

    def good(device, dtype, size):
        x = torch.ones(3)
        return {"o": smoke.compare("o", x, x, x + 1e-3, torch.bfloat16)}

    def wrong(device, dtype, size):
        seen_on_disk.append(json.loads(path.read_text())["checks"][-1]["status"])
        x = torch.ones(3)
        return {"o": smoke.compare("o", x + 1, x, x, torch.bfloat16)}

    def broken(device, dtype, size):
        clock.t += 50
        raise RuntimeError("no kernel image")

    doc = smoke.run_smoke(path, deadline=1040.0, checks=[("a", good), ("b", wrong), ("c", broken),
                                                         ("d", good)], clock=clock, log=lambda m: None)
    assert seen_on_disk == ["ok"]  # the first check's record was on disk before the second ran
    assert [c["status"] for c in doc["checks"]] == ["ok", "fail", "error", "skipped"]
    assert "error 1 >" in doc["checks"][1]["reason"]
    assert doc["checks"][2]["reason"] == "RuntimeError: no kernel image"
    assert doc["counts"] == {"ok": 1, "fail": 1, "error": 1, "skipped": 1}
    assert json.loads(path.read_text()) == doc


def test_compare_rule():
    ref = torch.tensor([1.0, -2.0, float("-inf")])
    lowp = ref + torch.tensor([1e-2, 0.0, 0.0])
    assert smoke.compare("o", ref + 0.015, ref, lowp, torch.bfloat16)["ok"]  # < 2x + ulps
    assert not smoke.compare("o", ref + 0.1, ref, lowp, torch.bfloat16)["ok"]
    assert not smoke.compare("d0", ref * float("nan"), ref, lowp, torch.bfloat16)["ok"]
    assert smoke.compare("d0", ref + 1e-5, ref, ref, torch.float32)["ok"]


@pytest.mark.parametrize("name", ["flash causal fwd+bwd", "linear hybrid (window + linear, decay) fwd+bwd"])
def test_real_smoke_checks_pass_on_tiny_sizes(tmp_path, name):
    checks = [c for c in smoke.CHECKS if c[0] == name]
    doc = smoke.run_smoke(tmp_path / "smoke.json", float("inf"), device=DEVICE, dtype=torch.float32,
                          size="tiny", checks=checks, log=lambda m: None)
    assert doc["counts"]["ok"] == 1, doc["checks"]
    assert len(doc["checks"][0]["quantities"]) >= 2  # o and more (gradients, or lse)


def test_every_smoke_check_has_a_unique_name():
    names = [n for n, _ in smoke.CHECKS]
    assert len(set(names)) == len(names) == 11


def test_gpu_check_wiring_order_files_and_exit_code(tmp_path, monkeypatch):
    """command._gpu_check with the three phases replaced: the order, the budgets passed on, the
    autotune switch, and results.json/summary.txt written with every phase."""
    import argparse
    import time

    from attnkit.bench import command
    from attnkit.bench.sweep import environment

    order = []

    def fake_smoke(path, deadline, device):
        order.append(("smoke", round(deadline - time.time())))
        return {"counts": {"ok": 9, "fail": 1, "error": 0, "skipped": 0}}

    def fake_sweep(args, grid, device, out, meta, budget):
        order.append(("table", grid.kinds, grid.ns))
        return [], 0

    def fake_tests(out, test_args, timeout_s):
        order.append(("tests", test_args))
        return {"summary": "3 passed", "returncode": 0, "seconds": 1.0}

    monkeypatch.setattr(smoke, "run_smoke", fake_smoke)
    monkeypatch.setattr(command, "_sweep", fake_sweep)
    monkeypatch.setattr(command, "run_test_suite", fake_tests)
    monkeypatch.setattr(command, "process_start_time", time.time)
    monkeypatch.setenv("ATTNKIT_AUTOTUNE", "1")  # recorded, so the undo restores the original
    monkeypatch.delenv("ATTNKIT_AUTOTUNE")
    args = argparse.Namespace(check_time=420.0, time_budget=None, test_timeout=240.0,
                              test_args="-n 4 tests", kinds=None, impls=None, modes=None, n=None,
                              d=None, batch=None, heads=None, dtype=None, quick=False)
    code = command._gpu_check(args, "cuda", tmp_path, environment("cpu"))
    assert code == 1  # a smoke failure fails the check
    assert [o[0] for o in order] == ["smoke", "table", "tests"]
    assert order[0][1] == SMOKE_S and order[1][1:] == (gpu_check.HEADLINE_KINDS, (4096, 16384))
    assert order[2][1] == "-n 4 tests"
    assert __import__("os").environ["ATTNKIT_AUTOTUNE"] == "0"
    doc = json.loads((tmp_path / "results.json").read_text())
    text = json.dumps(doc)
    assert all(p in text for p in ('"smoke"', '"table"', '"tests"', "3 passed"))
    assert "tests: ran" in (tmp_path / "summary.txt").read_text()
