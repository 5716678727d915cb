"""``attnkit finetune --threads``: checked before anything runs, applied to torch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from attnkit.finetune.cli import main as cli_main  # noqa: E402


def test_negative_threads_is_one_line_and_exit_2(tmp_path, capsys):
    assert cli_main(["--quick", "--threads", "-1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads must be an integer >= 0" in err[0], err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_threads_is_applied_before_the_run(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))

    def stop(cfg):  # the run itself is not what this checks
        raise ValueError("stop here")

    monkeypatch.setattr("attnkit.finetune.train.train", stop)
    assert cli_main(["--quick", "--threads", "1", "--out", str(tmp_path / "run")]) == 2
    assert seen == [1]
