"""The same ``attnkit finetune`` command under ``torchrun --nproc_per_node 2`` (DDP on gloo, CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("accelerate")

from ft_helpers import cli_args, corpus_sample, make_model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not __import__("torch").distributed.is_available(), reason="torch.distributed missing")
def test_two_process_gloo_run(tmp_path):
    model = make_model_folder(tmp_path / "model")
    data = tmp_path / "data.txt"
    data.write_text(corpus_sample(12_000), encoding="utf-8")
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "attnkit.finetune.cli", *cli_args(model, data, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert (out / "adapter_model.safetensors").is_file()
    # rank 0 alone reports; the numbers are the ranks' shared (all-reduced) ones
    assert proc.stdout.count("results in") == 1, proc.stdout
