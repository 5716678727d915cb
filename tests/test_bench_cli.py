"""``attnkit bench`` end to end on the CPU (a still smaller grid than --quick), its argument
errors, ``--gpu-check``'s test-suite runner, and the pytest-benchmark suite in benchmarks/."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.bench.command import run_test_suite
from attnkit.bench.report import CSV_FIELDS, SCHEMA
from attnkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny sweep shared by the checks below (worker subprocesses, real measurements)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress",
            "--n", "64,128", "--point-time", "0.01", "--kinds", "dense,window,linear,lora",
            "--impls", "attnkit,sdpa-math,sdpa-cudnn,torch-quadratic,torch-unfused",
            "--modes", "fwd,fwd+bwd"]
    code = main(argv)
    return code, out


def test_quick_writes_json_csv_summary_and_plots(quick_run, capsys):
    code, out = quick_run
    assert code == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == SCHEMA
    meta = doc["meta"]
    for key in ("device", "device_name", "versions", "git_commit", "created", "memory_method",
                "timing_method", "cpu_threads"):
        assert key in meta, key
    assert meta["versions"]["torch"] == torch.__version__
    assert doc["grid"]["ns"] == [64, 128]
    rows = doc["rows"]
    # 4 kinds; attention kinds x (attnkit, sdpa-math, sdpa-cudnn), linear x 2, lora x 2; 2 modes; 2 N
    assert len(rows) == (2 * 3 + 2 + 2) * 2 * 2
    for r in rows:
        assert set(CSV_FIELDS) <= set(r)
        assert r["dtype"] == "float32" and r["device"] == "cpu"
        assert r["status"] in ("ok", "skipped"), (r["kind"], r["impl"], r["reason"])
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["time_ms"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] is not None for r in ok)
    cudnn = [r for r in rows if r["impl"] == "sdpa-cudnn"]
    assert cudnn and all(r["status"] == "skipped" and "CPU" in r["reason"] for r in cudnn)
    attnkit = [r for r in ok if r["impl"] == "attnkit"]
    assert len(attnkit) == 4 * 2 * 2
    assert all(r["speedup"] is not None and r["best_baseline"] for r in attnkit)
    assert {s["kind"] for s in doc["slopes"]} == {"dense", "window", "linear", "lora"}

    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and set(CSV_FIELDS) <= set(table[0])
    assert len((out / "rows.jsonl").read_text().splitlines()) == len(rows)
    assert "fitted log-log slopes" in (out / "summary.txt").read_text()
    if HAS_MPL:
        for name in ("time_fwd.png", "memory_fwd.png", "time_fwd_bwd.png", "memory_fwd_bwd.png"):
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.parametrize("argv, message", [
    (["--n", "abc"], "comma-separated integers"),
    (["--n", "0,64"], "positive integers"),
    (["--kinds", "dense,nope"], "unknown value(s) nope"),
    (["--modes", "backward"], "choose from fwd, bwd, fwd+bwd"),
    (["--time-budget", "-1"], "positive number"),
    (["--threads", "-2"], "--threads must be >= 0"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_gpu_check_without_a_gpu_says_so(tmp_path, capsys):
    assert main(["bench", "--gpu-check", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--device", "cuda", "--out", str(tmp_path)])
    assert e.value.code == 2 and "no CUDA device is visible" in capsys.readouterr().err


def test_gpu_check_test_runner_writes_log_and_junit(tmp_path):
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("def test_one():\n    assert 1 + 1 == 2\n")
    summary = run_test_suite(tmp_path, f"-n 1 {test_file} -p no:cacheprovider", timeout_s=120)
    assert summary["returncode"] == 0, (tmp_path / "tests.log").read_text()
    assert "1 passed" in summary["summary"]
    assert (tmp_path / "tests.xml").exists()


def _run_suite(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    # Drop this session's pytest/xdist variables: under xdist they would make pytest-benchmark in
    # the child think it runs under xdist too, and disable timing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"ATTNKIT_BENCH_N": "64", "ATTNKIT_BENCH_MODES": "fwd+bwd", **(env_extra or {})})
    return subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider",
                           "-p", "no:xdist", "-o", "addopts=", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None,
                    reason="pytest-benchmark is not installed")
def test_benchmark_suite_collects_and_runs_on_cpu(tmp_path):
    collected = _run_suite("--collect-only")
    assert collected.returncode == 0, collected.stdout + collected.stderr
    for name in ("test_attention[dense-attnkit-fwd+bwd-D32-N64]", "test_linear_attention[",
                 "test_lora[lora-peft-fwd+bwd-h128r8-N64]"):
        assert name in collected.stdout, name
    report = tmp_path / "bench.json"
    ran = _run_suite("--benchmark-only", f"--benchmark-json={report}",
                     env_extra={"ATTNKIT_BENCH_IMPLS": "attnkit,sdpa-math,torch-unfused"})
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    benches = json.loads(report.read_text())["benchmarks"]
    kinds = {b["extra_info"]["kind"] for b in benches}
    assert kinds >= {"dense", "causal", "window", "linear", "lora"}
    for b in benches:
        info = b["extra_info"]
        assert info["tflops"] > 0 and info["gbps"] > 0 and info["peak_mem_bytes"] >= 0, b["name"]


def test_plots_and_progress_degrade_without_matplotlib_rich_tqdm(monkeypatch, tmp_path):
    from attnkit.bench.progress import progress_bar
    from attnkit.bench.report import write_plots

    for name in ("matplotlib", "rich", "tqdm"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert "matplotlib is not installed" in write_plots(tmp_path, [])
    bar = progress_bar(2)
    bar.update("one")
    bar.close()
