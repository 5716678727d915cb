"""``attnkit finetune --attention linear:hedgehog,window=W``: linearising into the sliding-window +
linear hybrid (attention transfer against the hybrid student, LoRA on it, reload). One tiny run."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from ft_helpers import cli_args  # noqa: E402

from attnkit.attn.hf.specs import LinearAttention  # noqa: E402
from attnkit.finetune.cli import main as cli_main  # noqa: E402
from attnkit.finetune.config import parse_attention  # noqa: E402
from attnkit.finetune.load import load_finetuned  # noqa: E402


def test_linear_grammar_with_window():
    c = parse_attention("linear:hedgehog,window=64")
    assert (c.kind, c.feature_map, c.window) == ("linear", "hedgehog", 64)
    assert str(c) == "linear:hedgehog,window=64" and parse_attention(str(c)) == c
    assert parse_attention("linear:,window=8") == parse_attention("linear:hedgehog,window=8")
    assert parse_attention("linear:elu1").window is None
    for bad, match in (("linear:hedgehog,window=0", "integer >= 1"),
                       ("linear:hedgehog,window=x", "integer >= 1"),
                       ("linear:hedgehog,window=4,window=5", "twice"),
                       ("linear:hedgehog,size=4", "unexpected 'size=4'"),
                       ("linear:foo,window=4", "unknown feature map 'foo'")):
        with pytest.raises(ValueError, match=match):
            parse_attention(bad)


def test_finetune_into_the_hybrid(tmp_path, model_dir, data_file):
    out = tmp_path / "run"
    args = cli_args(model_dir, data_file, out, "--attention", "linear:hedgehog,window=2",
                    "--transfer-steps", "6", "--transfer-lr", "5e-2", "--no-calibration",
                    "--precision", "fp32") + ["--max-steps", "2"]
    assert cli_main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attention"] == "linear:hedgehog,window=2"
    assert set(summary["eval"]) == {"original", "after_transfer", "final"}
    assert all(v["perplexity"] > 1 for v in summary["eval"].values())
    t = summary["transfer"]
    assert t["steps"] == 6 and t["last_mse"] < t["first_mse"], t
    loaded, _ = load_finetuned(str(out))
    spec = loaded.get_base_model().model.layers[0].self_attn.__dict__["_attnkit_spec"][1]
    assert isinstance(spec, LinearAttention) and spec.window == 2
    ids = torch.randint(3, 250, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        hybrid = loaded(input_ids=ids).logits
    # the window matters: the same maps as pure linear attention give other logits
    from attnkit.finetune import linearize

    linearize.swap_to_linear(loaded.get_base_model(), "hedgehog", None)
    with torch.no_grad():
        pure = loaded(input_ids=ids).logits
    assert torch.isfinite(hybrid).all() and not torch.allclose(hybrid, pure, atol=1e-3)
