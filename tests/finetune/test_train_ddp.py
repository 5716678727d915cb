"""The same ``attnkit finetune`` command under ``torchrun --nproc_per_node 2`` (DDP on gloo, CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from ft_helpers import cli_args, corpus_sample, make_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]

#: Runs the CLI, and has every rank write the summary ``train`` returned to ``$FT_SUMMARY_DIR``.
SPY = """
import json, os, sys
import attnkit.finetune.train as train_module

_train = train_module.train

def spy(*args, **kwargs):
    summary = _train(*args, **kwargs)
    path = os.path.join(os.environ["FT_SUMMARY_DIR"], "rank%s.json" % os.environ["RANK"])
    with open(path, "w") as f:
        json.dump(summary, f)
    return summary

train_module.train = spy
from attnkit.finetune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(cmd, env, cwd, timeout):
    """``subprocess.run`` that kills the whole process group (torchrun and its workers) on timeout."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"timed out after {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return proc.returncode, stdout, stderr


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch.distributed missing")
def test_two_process_gloo_run(tmp_path):
    model = make_model_folder(tmp_path / "model")
    data = tmp_path / "data.txt"
    data.write_text(corpus_sample(12_000), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()  # a previous run's leftovers: rank 0 alone deletes them (--overwrite)
    (out / "old.txt").write_text("x")
    spy = tmp_path / "spy.py"
    spy.write_text(SPY, encoding="utf-8")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "FT_SUMMARY_DIR": str(tmp_path),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(spy), *cli_args(model, data, out, "--overwrite", "--lr", "auto", "--find-lr-steps", "6")]
    rc, stdout, stderr = _run(cmd, env, tmp_path, timeout=180)
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (out / "adapter_model.safetensors").is_file() and not (out / "old.txt").exists()
    # rank 0 alone reports
    assert stdout.count("results in") == 1, stdout
    # each rank trains on its own batches, so equal numbers on both ranks mean they are all-reduced
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in ("train_loss_curve", "eval_loss_curve", "eval", "train_sequences", "eval_sequences",
                "diagnoses", "peak_lr", "lr_finder"):
        assert ranks[0][key] == ranks[1][key] == summary[key], key
    assert len(summary["train_loss_curve"]) == 4
    # rank 0 ran the range test and told rank 1 its suggestion; rank 0 alone calibrates
    assert summary["peak_lr"] == summary["lr_finder"]["suggested_lr"] and (out / "lr_find.png").is_file()
    assert set(summary["calibration"]) == {"before", "after"} and ranks[1]["calibration"] == {}
