"""``attnkit bench`` end to end on the CPU (a still smaller grid than --quick), its argument
errors, ``--gpu-check``'s test-suite runner, and the pytest-benchmark suite in benchmarks/."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from attnkit.bench.command import (
    failed_attnkit_rows,
    process_start_time,
    run_test_suite,
)
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
    assert all(r["time_ms"] > 0 and r["tflops"] > 0 for r in ok)
    # Peak memory at N = 128 (every tensor at least glibc's 128 KiB mmap threshold, so counted):
    # a forward holds at least its output, a forward+backward at least the inputs' gradients.
    for r in ok:
        assert isinstance(r["peak_mem_bytes"], int) and r["peak_mem_bytes"] < 256 * 2**20, r
        if r["n"] != 128:
            continue
        tokens = r["batch"] * r["n"]
        if r["kind"] == "lora":
            out_bytes, grad_bytes = tokens * r["hidden"] * 4, (tokens + 2 * r["rank"]) * r["hidden"] * 4
        else:
            out_bytes = tokens * r["heads"] * r["d"] * 4
            grad_bytes = 3 * out_bytes  # q, k, v
        bound = out_bytes if r["mode"] == "fwd" else grad_bytes
        assert r["peak_mem_bytes"] >= bound, (r["kind"], r["impl"], r["mode"], r["peak_mem_bytes"], bound)
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
    # the workers' log holds what they say, not triton's teardown ("nanobind: leaked ...")
    assert "leaked" not in (out / "worker.log").read_text()
    summary = (out / "summary.txt").read_text()
    assert "fitted log-log slopes" in summary and "at least 3 points" in summary
    # baselines sit beside attnkit, with memory and both ratios; skipped ones are listed once
    header = next(line for line in summary.splitlines() if line.startswith("kind"))
    for col in ("time ms", "peak MiB", "speed-up", "mem ratio"):
        assert col in header, col
    dense_fwd = [line.split() for line in summary.splitlines()
                 if line.startswith("dense") and " fwd " in line and " 128 " in line]
    assert [c[1] for c in dense_fwd] == ["attnkit", "sdpa-math"], dense_fwd
    assert all(c[-2].endswith("x") or c[-3].endswith("x") for c in dense_fwd)
    assert "baselines skipped (not in the table):" in summary
    assert "sdpa-cudnn: sdpa-cudnn has no CPU kernel" in summary
    # two N per line: too few points for a slope (three at least), so none is claimed
    assert all(s["time_slope"] is None for s in doc["slopes"])
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


def test_gpu_check_test_runner_writes_log_and_junit(tmp_path, monkeypatch):
    """The suite runs with ATTNKIT_AUTOTUNE=0 (first tile only) unless the caller set it."""
    monkeypatch.delenv("ATTNKIT_AUTOTUNE", raising=False)
    test_file = tmp_path / "test_tiny.py"
    test_file.write_text("import os\ndef test_one():\n    assert os.environ['ATTNKIT_AUTOTUNE'] == '0'\n")
    summary = run_test_suite(tmp_path, f"-n 1 {test_file} -p no:cacheprovider", timeout_s=120)
    assert summary["returncode"] == 0, (tmp_path / "tests.log").read_text()
    assert "1 passed" in summary["summary"]
    assert summary["env"] == {"ATTNKIT_AUTOTUNE": "0"}
    assert (tmp_path / "tests.xml").exists()
    monkeypatch.setenv("ATTNKIT_AUTOTUNE", "1")
    test_file.write_text("import os\ndef test_one():\n    assert os.environ['ATTNKIT_AUTOTUNE'] == '1'\n")
    assert run_test_suite(tmp_path, f"-n 0 {test_file} -p no:cacheprovider", 120)["returncode"] == 0


def test_process_start_time_distrusts_a_boot_clock_far_in_the_past(monkeypatch):
    from attnkit.bench import command

    now = time.time()
    assert process_start_time() <= now
    monkeypatch.setattr(command, "_IMPORTED_AT", now + 10 * command.MAX_STARTUP_S)
    assert process_start_time() == now + 10 * command.MAX_STARTUP_S


def test_gpu_check_test_runner_kills_the_whole_suite_on_timeout(tmp_path):
    """pytest's children (xdist workers) must not outlive a timed-out suite: it runs in a session of
    its own and the whole process group is killed."""
    pid_file = tmp_path / "child.pid"
    test_file = tmp_path / "test_hang.py"
    test_file.write_text(
        "import subprocess, sys, time\n"
        "def test_hang():\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"    open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "    time.sleep(600)\n")
    summary = run_test_suite(tmp_path, f"-n 0 {test_file} -p no:cacheprovider", timeout_s=8)
    assert summary["returncode"] is None and summary["summary"].startswith("timed out after 8 s")
    assert summary["seconds"] < 60
    assert pid_file.exists(), (tmp_path / "tests.log").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # killed by SIGKILL; reaped by init
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        if _is_zombie(child):
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        pytest.fail("the test suite's grandchild survived the timeout")


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_process_start_time_is_recent():
    start = process_start_time()
    assert start <= time.time() and time.time() - start < 3600  # this process started recently


def test_gpu_check_fails_on_attnkit_errors_only():
    rows = [{"impl": "attnkit", "baseline": False, "status": "ok"},
            {"impl": "flex", "baseline": True, "status": "error"},
            {"impl": "attnkit", "baseline": False, "status": "skipped"}]
    assert failed_attnkit_rows(rows) == []
    rows.append({"impl": "attnkit-peft", "baseline": False, "status": "error"})
    assert [r["impl"] for r in failed_attnkit_rows(rows)] == ["attnkit-peft"]


def _run_suite(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    # Drop this session's pytest/xdist variables: under xdist they would make pytest-benchmark in
    # the child think it runs under xdist too, and disable timing. No GPU: the ids checked below
    # are the CPU grid's (also when this runs inside --gpu-check on a GPU machine).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env.update({"ATTNKIT_BENCH_N": "64", "ATTNKIT_BENCH_MODES": "fwd+bwd", "CUDA_VISIBLE_DEVICES": "",
                **(env_extra or {})})
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
           "-o", "addopts=", *args]
    # its own session, so a timeout kills it and everything it started
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


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
        assert info["tflops"] > 0 and info["gbps"] > 0, b["name"]
        assert isinstance(info["peak_mem_bytes"], int) and info["peak_mem_bytes"] < 256 * 2**20, b["name"]
    # the tensors here are tiny (16 KiB), so single points may read 0; all of them may not
    assert sum(b["extra_info"]["peak_mem_bytes"] for b in benches) > 0


def test_plots_and_progress_degrade_without_matplotlib_rich_tqdm(monkeypatch, tmp_path):
    from attnkit.bench.progress import progress_bar
    from attnkit.bench.report import write_plots

    for name in ("matplotlib", "rich", "tqdm"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert "matplotlib is not installed" in write_plots(tmp_path, [])
    bar = progress_bar(2)
    bar.update("one")
    bar.close()


def test_a_run_where_everything_is_skipped_says_why_and_fails(tmp_path, capsys):
    code = main(["bench", "--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
                 "--n", "64", "--kinds", "dense", "--impls", "sdpa-cudnn", "--modes", "fwd",
                 "--no-plots"])
    err = capsys.readouterr().err
    assert code == 1
    assert "nothing was measured" in err and "sdpa-cudnn has no CPU kernel" in err
    assert "NOTHING WAS MEASURED" in (tmp_path / "summary.txt").read_text()
