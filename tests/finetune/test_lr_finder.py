"""``--find-lr`` / ``--lr auto``: the suggestion rule, restoring the model, the CLI and its errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from ft_helpers import TINY, cli_args, make_model_folder  # noqa: E402

from attnkit.finetune.cli import main as cli_main  # noqa: E402
from attnkit.finetune.config import FinetuneConfig  # noqa: E402
from attnkit.finetune.lr_finder import SUGGEST_DIVISOR, find_lr, suggest_lr  # noqa: E402
from attnkit.finetune.train import run  # noqa: E402


def test_the_suggestion_is_a_decade_below_the_smoothed_minimum():
    lrs = [1e-6 * 10 ** (i / 10) for i in range(61)]  # 1e-6 .. 1
    # flat, then falling fastest around 1e-3, lowest at 1e-2, then blowing up
    losses = [5.0 - 2.0 / (1 + math.exp(-3 * (math.log10(lr) + 3))) + max(0.0, math.log10(lr) + 2) ** 2 * 4
              for lr in lrs]
    rec, smoothed = suggest_lr(lrs, losses)
    assert len(smoothed) == len(lrs)
    assert 10 ** -2.3 <= rec["lr_at_min"] <= 10 ** -1.6  # the EMA lags a little behind 1e-2
    assert rec["suggested_lr"] == pytest.approx(rec["lr_at_min"] / SUGGEST_DIVISOR)
    assert 10 ** -3.6 <= rec["lr_steepest"] <= 10 ** -2.4
    assert "warning" not in rec
    # a loss that only rises: the suggestion comes with a warning
    rec, _ = suggest_lr(lrs[:10], [5.0 + i for i in range(10)])
    assert rec["lr_at_min"] == lrs[0] and "never fell" in rec["warning"]


def test_find_lr_restores_the_model_and_rng(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from attnkit.finetune.dataset import PackedDataset

    folder = make_model_folder(tmp_path / "m")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      lora_dropout=0.1, task_type="CAUSAL_LM"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = PackedDataset(torch.randint(3, 250, (12, 16), generator=torch.Generator().manual_seed(1)))
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    model.eval()
    rec = find_lr(model, ds, steps=15, lr_min=1e-4, lr_max=10.0, batch_size=4, max_grad_norm=1.0)
    assert torch.equal(torch.rand(3), expected_next), "RNG state restored"
    assert not model.training, "train/eval mode restored"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert rec["steps_run"] >= 2 and len(rec["lrs"]) == len(rec["losses"]) == rec["steps_run"]
    assert rec["lrs"][0] == pytest.approx(1e-4)
    assert all(a < b for a, b in zip(rec["lrs"], rec["lrs"][1:], strict=False))
    assert rec["lrs"][0] <= rec["suggested_lr"] * SUGGEST_DIVISOR <= rec["lrs"][-1]


def test_cli_find_lr_alone_writes_the_plot_and_exits_0(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "out"
    args = cli_args(model_dir, data_file, out, "--find-lr", "--find-lr-steps", "12",
                    "--find-lr-min", "1e-4", "--find-lr-max", "1")
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "learning-rate range test: " in printed and "suggested peak lr" in printed
    rec = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 1000 and rec["plot"] == "lr_find.png"
    assert rec["steps"] == 12 and len(rec["lrs"]) == rec["steps_run"]
    assert rec["suggested_lr"] == pytest.approx(rec["lr_at_min"] / SUGGEST_DIVISOR)
    # no training: no checkpoint, adapter or summary
    assert not list(out.glob("checkpoints/checkpoint-*")) and not (out / "adapter_model.safetensors").exists()
    assert not (out / "summary.json").exists()


def test_lr_auto_trains_with_the_suggestion(tmp_path):
    cfg = FinetuneConfig(out=str(tmp_path / "run"), **{**TINY, "max_steps": 3, "lr": "auto",
                                                       "find_lr_steps": 10, "find_lr_min": 1e-4,
                                                       "find_lr_max": 1.0, "precision": "fp32"})
    summary, _ = run(cfg)
    assert summary["status"] == "finished" and summary["config"]["lr"] == "auto"
    f = summary["lr_finder"]
    assert summary["peak_lr"] == f["suggested_lr"] and "lrs" not in f
    on_disk = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert on_disk["suggested_lr"] == f["suggested_lr"]
    # the scheduler peaked at the suggestion: after warm-up step 1 the logged LR is just below it
    state = json.loads((tmp_path / "run" / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    lrs = [h["learning_rate"] for h in state["log_history"] if "learning_rate" in h]
    assert max(lrs) <= f["suggested_lr"] * (1 + 1e-6) and max(lrs) > 0.5 * f["suggested_lr"]


@pytest.mark.parametrize("extra, needle", [
    (["--lr", "fast"], "--lr 'fast': expected a positive number (e.g. 2e-3) or 'auto'"),
    (["--lr", "-1"], "--lr '-1': expected a positive number"),
    (["--find-lr", "--resume"], "--find-lr with --resume 'latest'"),
    (["--find-lr", "--lr", "auto"], "--find-lr with --lr auto"),
    (["--find-lr-steps", "1"], "--find-lr-steps must be an integer >= 2, got 1"),
    (["--find-lr-min", "1", "--find-lr-max", "0.1"],
     "--find-lr-min/--find-lr-max must satisfy 0 < min < max"),
], ids=["lr-word", "lr-negative", "find-lr-resume", "find-lr-auto", "few-steps", "min-above-max"])
def test_bad_lr_arguments_fail_early_with_one_line(tmp_path, model_dir, data_file, capsys, extra, needle):
    out = tmp_path / "out"
    assert cli_main(cli_args(model_dir, data_file, out, *extra)) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1, err
    assert not out.exists()


def test_a_resumed_lr_auto_run_reuses_the_recorded_suggestion(tmp_path):
    common = {**TINY, "max_steps": 4, "save_steps": 2, "lr": "auto", "find_lr_steps": 8,
              "find_lr_min": 1e-4, "find_lr_max": 1.0, "precision": "fp32"}
    out = tmp_path / "run"
    stopped, _ = run(FinetuneConfig(out=str(out), stop_after=2, **common))
    assert stopped["status"] == "interrupted"
    recorded = json.loads((out / "lr_find.json").read_text())["suggested_lr"]
    (out / "lr_find.png").unlink()  # a resume does not run the test again
    resumed, _ = run(FinetuneConfig(out=str(out), resume="latest", **common))
    assert resumed["status"] == "finished" and resumed["peak_lr"] == recorded
    assert not (out / "lr_find.png").exists()
    (out / "lr_find.json").unlink()
    with pytest.raises(ValueError, match=r"--lr auto with --resume: .*lr_find.json' is missing"):
        run(FinetuneConfig(out=str(out), resume="latest", **common))


def test_a_run_recorded_before_the_range_test_existed_still_resumes(tmp_path):
    out = tmp_path / "run"
    common = {**TINY, "max_steps": 3, "save_steps": 2}
    run(FinetuneConfig(out=str(out), stop_after=2, **common))
    record = json.loads((out / "run_config.json").read_text())
    for key in ("find_lr_steps", "find_lr_min", "find_lr_max"):  # as written by an older attnkit
        del record[key]
    (out / "run_config.json").write_text(json.dumps(record))
    resumed, _ = run(FinetuneConfig(out=str(out), resume="latest", **common))
    assert resumed["status"] == "finished" and resumed["resumed_from_step"] == 2
    # a new setting changed from its default is still a difference
    with pytest.raises(ValueError, match="--find-lr-steps was None, now 50"):
        run(FinetuneConfig(out=str(out), resume="latest", **{**common, "find_lr_steps": 50}))
