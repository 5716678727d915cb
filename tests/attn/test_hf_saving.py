"""What ``save_pretrained`` writes for an attnkit model and what ``from_pretrained`` gives back:
registry names in ``config.json``, configs written with class paths (before registry names),
and a reload in a fresh process, with and without ``import attnkit.hf``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

tf = pytest.importorskip("transformers")

from attnkit import Causal, Dense, SlidingWindow, longformer  # noqa: E402
from attnkit.attn import hf  # noqa: E402
from attnkit.attn.hf.persist import LEGACY_CLASS_PATHS, spec_from_json, spec_to_json  # noqa: E402
from tests.attn.hf_models import batch, build  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
N = 10


def _logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _config(path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


# --------------------------------------------------------------------------------------------
# Registry names
# --------------------------------------------------------------------------------------------


def test_specs_are_written_with_registry_names_and_read_back():
    block = longformer(32, 16, window=8, global_tokens=1, causal=True)
    cases = [
        (Dense(), {"type": "dense"}),
        (Causal(), {"type": "causal"}),
        (SlidingWindow(7), {"type": "sliding_window", "left": 7, "right": 0}),
        (hf.LinearAttention(feature_map="relu", eps=1e-3),
         {"type": "linear_attention", "feature_map": "relu", "normalize": True, "eps": 1e-3,
          "scale": None, "decay": None, "window": None}),
        (hf.LinearAttention(decay=(0.9, 0.5)),
         {"type": "linear_attention", "feature_map": "elu1", "normalize": True, "eps": 1e-6,
          "scale": None, "decay": [0.9, 0.5], "window": None}),
    ]
    for spec, written in cases:
        assert spec_to_json(spec) == written
        assert spec_from_json(json.loads(json.dumps(written)), "x") == spec
    raw = spec_to_json(block)
    assert raw["type"] == "block_sparse" and raw["block_size"] == 16 and raw["causal"] is True
    back = spec_from_json(json.loads(json.dumps(raw)), "x")
    assert torch.equal(back.dense_mask(32, 32), block.dense_mask(32, 32))
    assert "class" not in json.dumps(raw) and "attnkit." not in json.dumps(raw)


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown attnkit attention type 'banded'; known types: "
                                         r"'dense', 'causal', 'sliding_window', 'block_sparse', "
                                         r"'linear_attention'"):
        spec_from_json({"type": "banded", "left": 3}, "config.attnkit_attention['default']")
    with pytest.raises(ValueError, match=r"'attnkit.attn.patterns.Banded' is not a class .*known "
                                         r"class paths: 'attnkit.attn.patterns.Dense'"):
        spec_from_json({"class": "attnkit.attn.patterns.Banded", "fields": {}}, "default")
    with pytest.raises(ValueError, match=r"cannot rebuild 'sliding_window' from \{'width': 3\}"):
        spec_from_json({"type": "sliding_window", "width": 3}, "default")


#: What ``spec_to_json`` wrote at 907701e: ``f"{cls.__module__}.{cls.__qualname__}"``.
OLD_PATHS = {
    "dense": "attnkit.attn.patterns.Dense",
    "causal": "attnkit.attn.patterns.Causal",
    "sliding_window": "attnkit.attn.patterns.SlidingWindow",
    "block_sparse": "attnkit.attn.block_sparse.BlockSparse",
    "linear_attention": "attnkit.attn.hf_specs.LinearAttention",
}


def _legacy(entry: dict | None) -> dict | None:
    """The entry as attnkit wrote it before registry names: ``{"class": path, "fields": ...}``."""
    if entry is None:
        return None
    fields = {k: v for k, v in entry.items() if k != "type"}
    return {"class": OLD_PATHS[entry["type"]], "fields": fields}


def test_every_old_class_path_has_an_alias():
    assert {path: LEGACY_CLASS_PATHS.get(path) for path in OLD_PATHS.values()} == \
        {path: name for name, path in OLD_PATHS.items()}
    assert spec_from_json({"class": OLD_PATHS["dense"], "fields": {}}, "x") == Dense()
    assert spec_from_json({"class": OLD_PATHS["causal"], "fields": {}}, "x") == Causal()


def test_a_config_written_with_class_paths_still_loads(tmp_path):
    """``config.json`` as the single-module ``attnkit.attn.hf`` wrote it (class paths, including
    ``attnkit.attn.hf_specs.LinearAttention``, which has moved; no ``attn_implementation``)."""
    n = 32
    model = build("llama", num_hidden_layers=3)
    ids = torch.randint(3, 128, (2, n), generator=torch.Generator().manual_seed(4))
    hf.swap_attention(model, SlidingWindow(2))
    hf.swap_attention(model, hf.LinearAttention(eps=1e-5), layers=[1])
    hf.swap_attention(model, longformer(n, 16, window=8, global_tokens=1, causal=True), layers=[2])
    ref = _logits(model, ids)
    model.save_pretrained(tmp_path)
    cfg = _config(tmp_path)
    entry = cfg["attnkit_attention"]
    old = {"default": _legacy(entry["default"]),
           "layers": {k: _legacy(v) for k, v in entry["layers"].items()}}
    assert old["layers"]["1"]["class"] == "attnkit.attn.hf_specs.LinearAttention"
    assert old["default"] == {"class": "attnkit.attn.patterns.SlidingWindow",
                              "fields": {"left": 2, "right": 0}}
    cfg["attnkit_attention"] = old
    del cfg["attn_implementation"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkit").eval()
    torch.testing.assert_close(_logits(loaded, ids), ref, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# attn_implementation in config.json
# --------------------------------------------------------------------------------------------


def test_config_records_the_implementation_until_restored(tmp_path):
    model = build("llama")
    hf.swap_attention(model, SlidingWindow(2))
    model.save_pretrained(tmp_path / "swapped")
    assert _config(tmp_path / "swapped")["attn_implementation"] == "attnkit"
    # transformers pops the key when it reads the config; the first attention call records it
    # again, so a reloaded model saved again keeps it
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "swapped")
    assert loaded.config._attn_implementation == "attnkit"
    _logits(loaded, *batch("right", N=6))
    loaded.save_pretrained(tmp_path / "again")
    again = _config(tmp_path / "again")
    assert again["attn_implementation"] == "attnkit"
    assert again["attnkit_attention"] == _config(tmp_path / "swapped")["attnkit_attention"]
    helper = hf.from_pretrained(tmp_path / "swapped")  # no forward pass needed
    helper.save_pretrained(tmp_path / "helper")
    assert _config(tmp_path / "helper")["attn_implementation"] == "attnkit"
    hf.restore_attention(model)
    model.save_pretrained(tmp_path / "restored")
    restored = _config(tmp_path / "restored")
    assert "attn_implementation" not in restored and "attnkit_attention" not in restored


def test_the_feature_map_attribute_is_the_one_finetune_attaches():
    from attnkit.finetune import linearize

    assert linearize.ATTR == hf.FEATURE_MAP_ATTR == "attnkit_feature_map"


def test_a_feature_map_not_held_by_the_layer_is_not_saved():
    from attnkit.attn import HedgehogFeatureMap

    model = build("llama")
    hf._warned.clear()
    with pytest.warns(UserWarning, match="not the layer's 'attnkit_feature_map' submodule"):
        hf.swap_attention(model, hf.LinearAttention(feature_map=HedgehogFeatureMap(16, 16)))
    assert "unsaved" in model.config.attnkit_attention["default"]


# --------------------------------------------------------------------------------------------
# A fresh process
# --------------------------------------------------------------------------------------------


def _run(script: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def _saved_models(tmp_path: Path):
    """Three tiny saved Llamas and their in-process logits: a pattern swap, linear attention with
    elu + 1, and linear attention with learned Hedgehog maps (as ``attnkit finetune`` attaches
    them), each on its own model."""
    from attnkit.finetune import linearize

    ids, mask = batch("left", B=2, N=N)
    models = {}
    swapped = build("llama")
    hf.swap_attention(swapped, SlidingWindow(2))
    hf.swap_attention(swapped, Dense(), layers=[1])
    models["swapped"] = swapped
    elu = build("llama", seed=1)
    linearize.swap_to_linear(elu, "elu1")
    models["elu1"] = elu
    hedgehog = build("llama", seed=2)
    g = torch.Generator().manual_seed(7)
    for fm in linearize.attach_feature_maps(hedgehog):
        with torch.no_grad():  # away from the identity start, so a lost map would show
            fm.weight.add_(0.3 * torch.randn(fm.weight.shape, generator=g))
            fm.bias.add_(0.3 * torch.randn(fm.bias.shape, generator=g))
    linearize.swap_to_linear(hedgehog, "hedgehog")
    models["hedgehog"] = hedgehog
    logits = {}
    for name, model in models.items():
        logits[name] = _logits(model, ids, mask)
        model.save_pretrained(tmp_path / name)
    linearize.attach_feature_maps(hedgehog)  # what losing the trained maps would give
    linearize.swap_to_linear(hedgehog, "hedgehog")
    lost = _logits(hedgehog, ids, mask)
    assert (lost - logits["hedgehog"]).abs().max() > 1e-3, "the trained maps must matter"
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    return logits


def test_reload_in_a_fresh_process_gives_the_same_logits(tmp_path):
    logits = _saved_models(tmp_path)
    cfg = _config(tmp_path / "hedgehog")
    fm = cfg["attnkit_attention"]["layers"]["0"]["feature_map"]
    assert fm == {"type": "hedgehog", "head_dim": 16, "feature_dim": 16, "num_heads": None}
    done = _run("""
        import torch, transformers
        import attnkit.hf
        inputs = torch.load("inputs.pt")
        out = {}
        def run(model):
            with torch.no_grad():
                return model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
        for name in ("swapped", "elu1"):
            model = transformers.AutoModelForCausalLM.from_pretrained(name)
            assert model.config._attn_implementation == "attnkit", model.config._attn_implementation
            out[name] = run(model)
        plain = transformers.AutoModelForCausalLM.from_pretrained("hedgehog")
        try:
            run(plain)
        except ValueError as e:
            out["plain_hedgehog_error"] = str(e)
        out["hedgehog"] = run(attnkit.hf.from_pretrained("hedgehog"))
        torch.save(out, "out.pt")
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    for name in ("swapped", "elu1", "hedgehog"):
        torch.testing.assert_close(out[name], logits[name], rtol=0, atol=0, msg=name)
    error = out.get("plain_hedgehog_error", "")
    assert "learned Hedgehog feature map" in error and "attnkit.hf.from_pretrained(path)" in error


def test_reload_without_attnkit_fails_and_names_it(tmp_path):
    """A process that never imported attnkit: transformers itself refuses the saved
    ``attn_implementation="attnkit"`` (never a silent sdpa model)."""
    model = build("llama")
    hf.swap_attention(model, hf.LinearAttention())
    model.save_pretrained(tmp_path / "linear")
    done = _run("""
        import sys, transformers
        try:
            transformers.AutoModelForCausalLM.from_pretrained("linear")
        except ValueError as e:
            assert "attnkit" not in sys.modules
            print("ERROR:", e)
        else:
            print("LOADED")
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'ERROR: Specified `attn_implementation="attnkit"` is not supported' in done.stdout


def test_a_per_layer_edit_keeps_the_other_layers_in_process_specs():
    """A callable feature map is not in the config; editing layer 0 must not make layer 1 read
    its (unsaved) entry back, which would raise."""
    softplus = torch.nn.functional.softplus
    model = build("llama")
    ids, mask = batch("right", N=8)
    hf._warned.clear()
    with pytest.warns(UserWarning, match="cannot be written to the config"):
        hf.swap_attention(model, hf.LinearAttention(feature_map=softplus))
    hf.swap_attention(model, SlidingWindow(2), layers=[0])
    out = _logits(model, ids, mask)
    ref = build("llama")
    hf.swap_attention(ref, SlidingWindow(2), layers=[0])
    hf._warned.clear()
    with pytest.warns(UserWarning, match="cannot be written to the config"):
        hf.swap_attention(ref, hf.LinearAttention(feature_map=softplus), layers=[1])
    torch.testing.assert_close(out, _logits(ref, ids, mask), rtol=0, atol=0)
