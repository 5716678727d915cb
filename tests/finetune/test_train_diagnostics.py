"""Failure-mode signatures and calibration on real (tiny) runs of the embedded model on the
embedded corpus: each run is made to show one signature."""

from __future__ import annotations

import json
import types

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from ft_helpers import CAPABLE, TINY, corpus_sample, eval_split  # noqa: E402

from attnkit.finetune.calibration import calibrate_model  # noqa: E402
from attnkit.finetune.cli import main as cli_main  # noqa: E402
from attnkit.finetune.config import FinetuneConfig  # noqa: E402
from attnkit.finetune.diagnostics import NON_FINITE_STATUS  # noqa: E402
from attnkit.finetune.train import run  # noqa: E402


def _kinds(summary):
    return [d["kind"] for d in summary["diagnoses"]]


def test_a_learning_rate_of_1e_7_plateaus(tmp_path):
    summary, _ = run(FinetuneConfig(out=str(tmp_path / "run"), precision="fp32",
                                    **{**TINY, "lr": 1e-7, "max_steps": 12, "eval_steps": 12,
                                       "save_steps": 12}))
    assert summary["status"] == "finished" and _kinds(summary) == ["plateau"], summary["diagnoses"]
    d = summary["diagnoses"][0]
    assert d["step"] == 1 + 8 and "early plateau at a high loss" in d["message"]
    assert abs(d["evidence"]["late_mean"] - d["evidence"]["first_loss"]) < 0.02 * d["evidence"]["first_loss"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["diagnoses"] == summary["diagnoses"]


@pytest.mark.parametrize("overrides, kind", [
    ({"max_grad_norm": 0.01}, "clipping_most_steps"),
    ({"lr": 1e3, "warmup_steps": 0}, "vanishing_gradients"),  # saturates: the gradients die
], ids=["clip-0.01", "lr-1e3"])
def test_heavy_clipping_and_vanishing_gradients(tmp_path, overrides, kind):
    summary, _ = run(FinetuneConfig(out=str(tmp_path / "run"), precision="fp32",
                                    **{**TINY, "max_steps": 12, "eval_steps": 12, "save_steps": 12,
                                       **overrides}))
    assert kind in _kinds(summary), summary["diagnoses"]
    d = next(d for d in summary["diagnoses"] if d["kind"] == kind)
    if kind == "clipping_most_steps":
        assert d["evidence"]["median_grad_norm"] > 1.5 * 0.01 and d["step"] == 10
    else:
        assert max(d["evidence"]["recent_grad_norms"]) < 1e-3 * d["evidence"]["peak_grad_norm"]


def test_a_too_high_learning_rate_spikes(tmp_path):
    summary, _ = run(FinetuneConfig(out=str(tmp_path / "run"), precision="fp32",
                                    **{**CAPABLE, "lr": 1.0, "warmup_steps": 8, "max_steps": 12,
                                       "eval_steps": 12, "save_steps": 12}))
    assert "loss_spike" in _kinds(summary), summary["diagnoses"]
    spike = next(d for d in summary["diagnoses"] if d["kind"] == "loss_spike")
    losses = dict(summary["train_loss_curve"])
    assert losses[spike["step"]] == pytest.approx(spike["evidence"]["loss"], rel=1e-5)
    assert spike["evidence"]["loss"] > 1.1 * spike["evidence"]["window_mean"]


def test_a_far_too_high_learning_rate_stops_at_the_non_finite_loss(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--out", str(out), "--seq-len", "32", "--batch-size", "4", "--max-steps", "8",
            "--eval-steps", "4", "--save-steps", "2", "--logging-steps", "1", "--warmup-steps", "0",
            "--lr", "1e5", "--rank", "4", "--dropout", "0", "--max-eval-sequences", "4", "--no-progress",
            "--precision", "fp32"]
    assert cli_main(args) == 4
    printed = capsys.readouterr()
    assert printed.err.count("diagnosis: step ") == 1 and "non-finite training loss" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == NON_FINITE_STATUS and _kinds(summary) == ["non_finite_loss"]
    step, last = summary["step"], summary["last_finite_step"]
    assert last == step - 1 and step < 8
    # no checkpoint at or after the bad step; the one named is the newest before it
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept and max(kept) <= last
    assert summary["last_good_checkpoint"] == str(out / "checkpoints" / f"checkpoint-{max(kept)}")
    assert f"last good checkpoint: {summary['last_good_checkpoint']}" in printed.out
    assert not (out / "adapter_model.safetensors").exists()


def test_a_tiny_corpus_trained_long_overfits(tmp_path):
    data = tmp_path / "small.txt"
    data.write_text(corpus_sample(1500), encoding="utf-8")  # a slice of the embedded corpus
    summary, _ = run(FinetuneConfig(out=str(tmp_path / "run"), data=str(data), precision="fp32",
                                    **{**CAPABLE, "lr": 1e-2, "warmup_steps": 2, "max_steps": 60,
                                       "eval_steps": 10, "save_steps": 120, "logging_steps": 2,
                                       "eval_fraction": 0.3}))
    assert "overfitting" in _kinds(summary), summary["diagnoses"]
    d = next(d for d in summary["diagnoses"] if d["kind"] == "overfitting")
    evals = dict(summary["eval_loss_curve"])
    assert evals[d["step"]] > evals[d["evidence"]["best_eval_step"]] * 1.02
    assert d["evidence"]["train_loss_now"] < d["evidence"]["train_loss_then"]
    # and it is real: at the end the train loss is far below the eval loss, which is above its minimum
    assert summary["last_train_loss"] < summary["eval_loss"] - 1.0
    assert summary["eval_loss"] > min(evals.values())


def test_calibration_before_and_after_and_an_over_confident_model(tmp_path):
    out = tmp_path / "run"
    summary, model = run(FinetuneConfig.quick(out=str(out), precision="fp32",
                                              **{**TINY, "max_steps": 12, "eval_steps": 6, "save_steps": 6}))
    calib = summary["calibration"]
    assert set(calib) == {"before", "after"}
    after = calib["after"]
    assert after["tokens"] == summary["eval_sequences"] * (TINY["seq_len"] - 1)
    assert after["nll"] == pytest.approx(summary["eval_loss"], rel=1e-4)  # the eval loss, token-mean
    assert 0 <= after["ece"] <= 1 and after["temperature"] > 0
    assert (out / "reliability.png").stat().st_size > 1000
    assert json.loads((out / "summary.json").read_text())["reliability_diagram"] == "reliability.png"

    # the same model with its logits x5 on a bigger held-out set of the embedded corpus
    held = eval_split(out, TINY["seq_len"], 64)

    class Scaled(torch.nn.Module):
        def __init__(self, inner, k):
            super().__init__()
            self.inner, self.k = inner, k

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=self.inner(input_ids=input_ids).logits * self.k)

    plain = calibrate_model(model, held, 8)
    hot = calibrate_model(Scaled(model, 5.0), held, 8)
    assert hot["ece"] > plain["ece"] and hot["ece"] > hot["ece_scaled"] + 0.05
    assert hot["temperature"] > 1 and hot["temperature"] == pytest.approx(5 * plain["temperature"], rel=0.15)
    assert hot["nll_scaled"] < hot["nll_report"]
