"""``attnkit.finetune.train``: the quick default, reloading the adapter, swapped attention,
linearisation, resume, bad arguments. Tiny models, a few optimizer steps each."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from ft_helpers import TINY, cli_args, corpus_sample, make_model_folder  # noqa: E402

from attnkit.finetune.cli import main as cli_main  # noqa: E402
from attnkit.finetune.config import FinetuneConfig, parse_attention  # noqa: E402
from attnkit.finetune.train import run  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "notes.txt"
    path.write_text(corpus_sample(12_000), encoding="utf-8")
    return path


def _ids(summary_or_n=2, n=32, vocab=250):
    return torch.randint(3, vocab, (summary_or_n, n), generator=torch.Generator().manual_seed(5))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_quick_default_lowers_loss_and_adapter_loads_in_plain_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = FinetuneConfig.quick(out=str(tmp_path / "run"), **{**TINY, "max_steps": 12, "eval_steps": 6,
                                                             "save_steps": 6})
    summary, model = run(cfg)
    assert summary["status"] == "finished" and summary["steps"] == 12
    assert summary["last_train_loss"] < summary["first_train_loss"] - 0.2, summary["train_loss_curve"]
    assert summary["eval"]["final"]["loss"] < summary["eval"]["original"]["loss"]
    out = tmp_path / "run"
    for name in ("adapter_config.json", "adapter_model.safetensors", "attention.json", "summary.json",
                 "loss_curve.png"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval_perplexity"] > 1 and on_disk["tokens_per_second"] > 0
    assert on_disk["peak_memory_mib"] > 0 and on_disk["config"]["max_steps"] == 12

    # plain PEFT (no attnkit kernels) reproduces the fine-tuned model's logits
    base_path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out))
    ids = _ids()
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)


def test_sliding_window_swap_is_recorded_and_reloads(tmp_path, model_dir, data_file):
    from attnkit.attn.patterns import SlidingWindow
    from attnkit.finetune.load import load_finetuned

    out = tmp_path / "run"
    summary, model = run(FinetuneConfig(model=str(model_dir), data=str(data_file), out=str(out),
                                        attention="sliding:8", **{**TINY, "max_steps": 3}))
    assert set(summary["eval"]) == {"original", "swapped", "final"}
    record = json.loads((out / "attention.json").read_text())
    assert record["kind"] == "sliding" and record["attn_implementation"] == "attnkit"
    loaded, tok = load_finetuned(str(out))
    spec = loaded.get_base_model().model.layers[0].self_attn.__dict__["_attnkit_spec"][1]
    assert spec == SlidingWindow(7, 0)
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)


def test_linearise_with_attention_transfer(tmp_path, model_dir, data_file):
    from attnkit.finetune.load import load_finetuned

    out = tmp_path / "run"
    summary, model = run(FinetuneConfig(model=str(model_dir), data=str(data_file), out=str(out),
                                        attention="linear", transfer_steps=6, transfer_lr=5e-2,
                                        **{**TINY, "max_steps": 2, "eval_steps": 2, "save_steps": 2}))
    assert set(summary["eval"]) == {"original", "after_transfer", "final"}
    t = summary["transfer"]
    assert t["steps"] == 6 and t["last_mse"] < t["first_mse"], t
    assert (out / "feature_maps.safetensors").is_file()
    loaded, _ = load_finetuned(str(out))
    ids = _ids()
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=2e-5, rtol=1e-4)


def test_resume_continues_with_same_steps_and_data_order(tmp_path, model_dir, data_file):
    common = dict(model=str(model_dir), data=str(data_file), **{**TINY, "max_steps": 6, "save_steps": 3})
    whole, _ = run(FinetuneConfig(out=str(tmp_path / "whole"), **common))

    part = tmp_path / "part"
    stopped, _ = run(FinetuneConfig(out=str(part), stop_after=3, **common))
    assert stopped["status"] == "interrupted" and stopped["step"] == 3
    assert not (part / "summary.json").exists() and not (part / "adapter_model.safetensors").exists()
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
], ids=["missing-model", "seq-too-long", "unknown-pattern", "bad-window", "bad-feature-map",
        "transfer-not-linear", "bad-target", "missing-data"])
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
    args = cli_args(model_dir, data_file, out, "--attention", "sliding:16") + ["--seq-len", "96",
                                                                                "--max-steps", "1"]
    assert cli_main(args) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["seq_len"] == 96


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
