"""``attnkit.finetune.train``: the quick default, reloading the adapter, swapped attention,
linearisation, resume, bad arguments. Tiny models, a few optimizer steps each."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from ft_helpers import TINY, cli_args  # noqa: E402

from attnkit.finetune.cli import main as cli_main  # noqa: E402
from attnkit.finetune.config import FinetuneConfig, parse_attention  # noqa: E402
from attnkit.finetune.dataset import split_blocks, split_documents  # noqa: E402
from attnkit.finetune.load import load_finetuned  # noqa: E402
from attnkit.finetune.train import format_summary, run  # noqa: E402


def _ids(summary_or_n=2, n=32, vocab=250):
    return torch.randint(3, vocab, (summary_or_n, n), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def test_quick_default_lowers_loss_and_adapter_loads_in_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # fp32 throughout (on a GPU "auto" would train in bf16): the logits are compared at 2e-5
    cfg = FinetuneConfig.quick(out=str(tmp_path / "run"), **{**TINY, "max_steps": 12, "eval_steps": 6,
                                                             "save_steps": 6, "precision": "fp32"})
    summary, model = run(cfg)
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["last_train_loss"] < summary["first_train_loss"] - 0.2, summary["train_loss_curve"]
    assert summary["eval"]["final"]["loss"] < summary["eval"]["original"]["loss"]
    assert summary["diagnoses"] == [], "the quick preset shows no failure-mode signature"
    assert set(summary["calibration"]) == {"before", "after"} and summary["peak_lr"] == cfg.lr
    printed = format_summary(summary)
    assert "calibration after " in printed and "diagnoses: none" in printed, printed
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "attention.json", "summary.json",
                 "loss_curve.png", "reliability.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval_perplexity"] > 1 and on_disk["tokens_per_second"] > 0
    assert on_disk["peak_memory_mib"] > 0 and on_disk["config"]["max_steps"] == 12
    eval_steps = [step for step, _ in on_disk["eval_loss_curve"]]
    assert eval_steps == [6, 12], "one eval point per step (the final evaluate() is not repeated)"
    assert on_disk["eval_loss_curve"][-1][1] == pytest.approx(on_disk["eval_loss"])

    # plain PEFT (no attnkit kernels) reproduces the fine-tuned model's logits
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out))
    plain.to(model.device)
    ids = _ids()
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)

    # the adapter records OUT/base_model by absolute path; a moved folder falls back to its own copy
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(out), str(moved))
    assert not Path(base_path).exists()
    with pytest.warns(UserWarning, match="does not exist; using"):
        loaded, _ = load_finetuned(str(moved), device=model.device)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)


def test_sliding_window_swap_is_recorded_and_reloads(tmp_path, model_dir, data_file):
    from attnkit.attn.patterns import SlidingWindow

    out = tmp_path / "run"
    summary, model = run(FinetuneConfig(model=str(model_dir), data=str(data_file), out=str(out),
                                        attention="sliding:8", precision="fp32",
                                        **{**TINY, "max_steps": 3}))
    assert set(summary["eval"]) == {"original", "swapped", "final"}
    assert set(summary["calibration"]) == {"before", "swapped", "after"}
    record = json.loads((out / "attention.json").read_text())
    assert record["kind"] == "sliding" and record["attn_implementation"] == "attnkit"
    loaded, tok = load_finetuned(str(out), device=model.device)
    spec = loaded.get_base_model().model.layers[0].self_attn.__dict__["_attnkit_spec"][1]
    assert spec == SlidingWindow(7, 0)
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)


def test_linearise_with_attention_transfer(tmp_path, model_dir, data_file):

    out = tmp_path / "run"
    summary, model = run(FinetuneConfig(model=str(model_dir), data=str(data_file), out=str(out),
                                        attention="linear", transfer_steps=6, transfer_lr=5e-2,
                                        precision="fp32",
                                        **{**TINY, "max_steps": 2, "eval_steps": 2, "save_steps": 2}))
    assert set(summary["eval"]) == {"original", "after_transfer", "final"}
    assert set(summary["calibration"]) == {"before", "after_transfer", "after"}
    t = summary["transfer"]
    assert t["steps"] == 6 and t["last_mse"] < t["first_mse"], t
    assert (out / "feature_maps.safetensors").is_file()
    loaded, _ = load_finetuned(str(out), device=model.device)
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)


def test_resume_continues_with_same_steps_and_data_order(tmp_path, model_dir, data_file):
    common = dict(model=str(model_dir), data=str(data_file), **{**TINY, "max_steps": 6, "save_steps": 3})
    whole, _ = run(FinetuneConfig(out=str(tmp_path / "whole"), **common))

    part = tmp_path / "part"
    stopped, _ = run(FinetuneConfig(out=str(part), stop_after=3, **common))
    assert stopped["status"] == "interrupted" and stopped["step"] == 3
    assert not (part / "summary.json").exists() and not (part / "adapter_model.safetensors").exists()
    # a resume must keep the run's settings: each changed one is named
    with pytest.raises(ValueError, match=r"--lr was 0\.02, now 1\.0; --seq-len was 32, now 16"):
        run(FinetuneConfig(out=str(part), resume="latest", **{**common, "lr": 1.0, "seq_len": 16}))
    resumed, _ = run(FinetuneConfig(out=str(part), resume="latest", **common))
    assert resumed["steps"] == whole["steps"] == 6 and resumed["resumed_from_step"] == 3
    # same batches in the same order, same optimizer/scheduler state: the same loss at every step
    assert [s for s, _ in resumed["train_loss_curve"]] == [s for s, _ in whole["train_loss_curve"]]
    torch.testing.assert_close(torch.tensor([v for _, v in resumed["train_loss_curve"]]),
                               torch.tensor([v for _, v in whole["train_loss_curve"]]), rtol=1e-4, atol=1e-5)
    assert resumed["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)


@pytest.mark.parametrize("extra, needle", [
    (["--model", "/no/such/folder"], "--model '/no/such/folder': no such folder"),
    (["--seq-len", "128"], "--seq-len 128 exceeds the maximum"),
    (["--attention", "spiral:3"], "unknown or malformed pattern 'spiral:3'"),
    (["--attention", "sliding:0"], "the window W must be an integer >= 1"),
    (["--attention", "linear:cosine"], "unknown feature map 'cosine'"),
    (["--transfer-steps", "5"], "--transfer-steps 5 needs --attention linear"),
    (["--target-modules", "q_proj,wq"], "no Linear layer named wq"),
    (["--data", "/no/such/data.txt"], "--data '/no/such/data.txt': no such file"),
    (["--max-eval-sequences", "0"], "--max-eval-sequences must be a positive integer, got 0"),
    (["--max-eval-sequences", "-3"], "--max-eval-sequences must be a positive integer, got -3"),
], ids=["missing-model", "seq-too-long", "unknown-pattern", "bad-window", "bad-feature-map",
        "transfer-not-linear", "bad-target", "missing-data", "zero-eval", "negative-eval"])
def test_bad_arguments_fail_early(tmp_path, model_dir, data_file, capsys, extra, needle):
    out = tmp_path / "out"
    args = cli_args(model_dir, data_file, out) + extra
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    # nothing that could pass for a result (target-module errors come after the model loads)
    assert not (out / "summary.json").exists() and not (out / "adapter_model.safetensors").exists()
    if "--target-modules" not in extra:
        assert not out.exists()


def test_seq_len_past_the_maximum_is_allowed_for_sliding_window(tmp_path, model_dir, data_file):
    out = tmp_path / "out"
    args = cli_args(model_dir, data_file, out, "--attention", "sliding:16", "--no-calibration") + [
        "--seq-len", "96", "--max-steps", "1"]
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["seq_len"] == 96
    assert summary["calibration"] == {} and not (out / "reliability.png").exists()


def test_out_folder_in_use_needs_resume_or_overwrite(tmp_path, model_dir, data_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli_main(cli_args(model_dir, data_file, out)) == 2
    assert "is not empty; pass --resume" in capsys.readouterr().err
    assert (out / "keep.txt").exists()
    assert cli_main(cli_args(model_dir, data_file, tmp_path / "none", "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_jsonl_and_folder_data(tmp_path):
    from attnkit.finetune.dataset import read_documents

    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n"second doc"\n\n', encoding="utf-8")
    (tmp_path / "b.txt").write_text("third doc", encoding="utf-8")
    assert read_documents(tmp_path) == ["first doc", "second doc", "third doc"]
    (tmp_path / "c.jsonl").write_text('{"body": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="c.jsonl' line 1: expected a JSON string or an object"):
        read_documents(tmp_path)


def test_attention_grammar():
    assert str(parse_attention("sliding:64")) == "sliding:64"
    assert parse_attention("bigbird").block == 64 and parse_attention("bigbird:32").block == 32
    lf = parse_attention("longformer:32")
    assert (lf.window, lf.block) == (32, 64)
    assert parse_attention("linear").feature_map == "hedgehog"
    assert parse_attention("dense").kind == "dense"
    with pytest.raises(ValueError, match="accepted"):
        parse_attention("bigbird:8")


def test_resume_with_changed_settings_or_data_is_refused(tmp_path, model_dir, data_file, capsys):
    data = tmp_path / "data.txt"
    shutil.copyfile(data_file, data)
    out = tmp_path / "out"
    assert cli_main(cli_args(model_dir, data, out, "--stop-after", "2")) == 3
    recorded = json.loads((out / "run_config.json").read_text())
    assert recorded["lr"] == 2e-3 and len(recorded["data_sha256"]) == 64
    assert "resume" not in recorded and "stop_after" not in recorded
    data.write_text(data.read_text(encoding="utf-8") + " more", encoding="utf-8")
    capsys.readouterr()
    assert cli_main(cli_args(model_dir, data, out, "--resume", "--lr", "0.01")) == 2
    err = capsys.readouterr().err
    assert "--resume: the settings differ" in err and "--lr was 0.002, now 0.01" in err, err
    assert "--data contents" in err, err
    assert not (out / "summary.json").exists()


def test_data_too_small_fails_before_writing(tmp_path, model_dir, capsys):
    data = tmp_path / "tiny.txt"
    data.write_text("a few words only", encoding="utf-8")
    out = tmp_path / "out"
    assert cli_main(cli_args(model_dir, data, out)) == 2
    assert "fewer than two sequences of --seq-len 32 (one to train on, one to evaluate)" in \
        capsys.readouterr().err
    assert not out.exists()


def test_held_out_split_by_document_and_fallback():
    # document i is made of the token i, so a block's values say which documents it holds
    lengths = [50 + 37 * (i % 7) for i in range(40)]
    docs = [[i] * n for i, n in enumerate(lengths)]
    total_blocks = sum(lengths) // 16
    train, held, how = split_documents(docs, 16, 0.05, 64)
    assert how == "documents"
    train_docs, held_docs = set(train.unique().tolist()), set(held.unique().tolist())
    assert held_docs and not train_docs & held_docs  # no document on both sides
    assert 1 <= held.shape[0] <= 2 * round(total_blocks * 0.05)
    assert train.shape[0] >= total_blocks - 2 * held.shape[0] - 2 * len(held_docs)
    # the cap: at most --max-eval-sequences held-out blocks
    assert split_documents(docs, 16, 0.4, 3)[1].shape[0] <= 3
    # deterministic (every process and every resume gets the same split)
    again = split_documents(docs, 16, 0.05, 64)
    assert torch.equal(again[0], train) and torch.equal(again[1], held)
    # a document too big to hold out whole is skipped, not allowed to swallow the training text
    big = [[0] * 5000] + [[i] * 60 for i in range(1, 30)]
    train, held, how = split_documents(big, 16, 0.05, 64)
    assert how == "documents" and 0 not in held.unique().tolist()
    # too few documents: packed blocks, as before
    train, held, how = split_documents([[1] * 1000, [2] * 1000], 16, 0.05, 64)
    assert how == "blocks" and held.shape[0] == round(125 * 0.05) and train.shape[0] == 125 - 6
    with pytest.raises(ValueError, match="fewer than two sequences"):
        split_documents([[1] * 20], 16, 0.05, 64)


def test_block_split_keeps_one_block_on_each_side():
    blocks = torch.arange(8).view(2, 4)
    for frac, cap in ((0.49, 64), (0.01, 1), (0.3, 1000)):
        train, held = split_blocks(blocks, frac, cap)
        assert train.shape[0] == 1 and held.shape[0] == 1
    train, held = split_blocks(torch.arange(400).view(100, 4), 0.3, 5)
    assert held.shape[0] == 5 and train.shape[0] == 95
