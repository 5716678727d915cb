"""``fuse_lora`` on small PEFT models built from configs (no downloads) against PEFT itself."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import Linear as PeftLoraLinear  # noqa: E402

import attnkit.finetune.peft_glue as peft_glue  # noqa: E402
from attnkit.finetune.peft_glue import (  # noqa: E402
    FusedLoraLinear,
    fuse_lora,
    register_fused_lora,
    unfuse_lora,
)

BACKENDS = ["triton", "torch"]


class MLP(nn.Module):
    """A plain module tree with Linear layers to target (PEFT's custom-model path)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(40, 72)
        self.mid = nn.Linear(72, 56, bias=False)
        self.down = nn.Linear(56, 24)

    def forward(self, x):
        return self.down(torch.tanh(self.mid(torch.relu(self.up(x)))))


def _mlp_peft(seed=0, **cfg):
    torch.manual_seed(seed)
    base = MLP()
    config = LoraConfig(r=cfg.pop("r", 4), lora_alpha=cfg.pop("lora_alpha", 8),
                        target_modules=["up", "mid", "down"], **cfg)
    model = get_peft_model(base, config)
    _randomize_lora(model)
    return model


def _randomize_lora(model):
    """PEFT zero-initialises lora_B; make both factors random so the LoRA path is exercised."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)


def _fused_copy(model, backend):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the eligible path must not warn
        return fuse_lora(copy.deepcopy(model), backend=backend)


def _close(got, want, tol=1e-5, name=""):
    """max |got - want| <= tol * max |want|: fp32 sums in another order, scaled to the tensor."""
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= tol * max(scale, 1e-6), f"{name}: max error {err:.3e} vs max |ref| {scale:.3e}"


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    peft_glue._warned.clear()
    yield
    peft_glue._warned.clear()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlp_outputs_and_grads_match_peft(backend):
    model = _mlp_peft()
    fused = _fused_copy(model, backend)
    n_fused = sum(isinstance(m, FusedLoraLinear) for m in fused.modules())
    assert n_fused == 3
    x = torch.randn(2, 7, 40)
    y_ref, y = model(x), fused(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    g_ref, g = _lora_grads(model), _lora_grads(fused)
    assert set(g) == set(g_ref) and all("lora_" in n for n in g)
    for name in g_ref:
        _close(g[name], g_ref[name], 1e-5, name)


def test_fan_in_fan_out_conv1d_base():
    """GPT-2 style Conv1D base layers (weight [in, out], fan_in_fan_out=True) fuse too."""
    from transformers.pytorch_utils import Conv1D

    class Conv(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn = Conv1D(48, 40)

        def forward(self, x):
            return self.c_attn(x)

    torch.manual_seed(0)
    model = get_peft_model(Conv(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"],
                                              fan_in_fan_out=True))
    _randomize_lora(model)
    fused = _fused_copy(model, "triton")
    x = torch.randn(5, 40)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_llama_matches_peft_and_trains_the_same(backend):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                      task_type="CAUSAL_LM")
    model = get_peft_model(base, lora)
    _randomize_lora(model)
    fused = _fused_copy(model, backend)
    ids = torch.randint(0, 128, (2, 11))
    out_ref = model(input_ids=ids, labels=ids)
    out = fused(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, out_ref.logits, rtol=1e-4, atol=1e-4)
    # two optimizer steps on each: the trained adapters stay equal
    for m in (model, fused):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05)
        for _ in range(2):
            opt.zero_grad()
            m(input_ids=ids, labels=ids).loss.backward()
            opt.step()
    ref_params = dict(model.named_parameters())
    for name, p in fused.named_parameters():
        if p.requires_grad:
            _close(p, ref_params[name], 1e-5, name)


def test_save_pretrained_reloads_in_plain_peft(tmp_path):
    from safetensors.torch import load_file

    model = _mlp_peft()
    fused = _fused_copy(model, "triton")
    fused.save_pretrained(tmp_path / "fused")
    model.save_pretrained(tmp_path / "plain")
    keys_fused = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    keys_plain = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    assert set(keys_fused) == set(keys_plain)
    for k in keys_plain:
        torch.testing.assert_close(keys_fused[k], keys_plain[k])

    torch.manual_seed(0)
    fresh = MLP()  # the same base weights as _mlp_peft(seed=0)
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "fused")
    assert not any(isinstance(m, FusedLoraLinear) for m in reloaded.modules())
    x = torch.randn(4, 40)
    torch.testing.assert_close(reloaded(x), fused(x), rtol=1e-5, atol=1e-5)
    # and a reloaded PEFT model fuses in place
    refused = fuse_lora(reloaded)
    assert refused is reloaded
    torch.testing.assert_close(refused(x), model(x), rtol=1e-5, atol=1e-5)


def _check_fallback(model, fused, x, words, **kw):
    with pytest.warns(UserWarning, match=words):
        y = fused(x, **kw)
    torch.testing.assert_close(y, model(x, **kw), rtol=0, atol=0)


def test_dora_stays_on_peft_path():
    model = _mlp_peft(use_dora=True)
    fused = fuse_lora(copy.deepcopy(model))
    _check_fallback(model, fused, torch.randn(3, 40), "DoRA")


def test_lora_bias_stays_on_peft_path():
    model = _mlp_peft(lora_bias=True)
    fused = fuse_lora(copy.deepcopy(model))
    _check_fallback(model, fused, torch.randn(3, 40), "LoRA bias")


def test_merged_and_disabled_stay_on_peft_path():
    model = _mlp_peft()
    fused = fuse_lora(copy.deepcopy(model))
    x = torch.randn(3, 40)
    with model.disable_adapter(), fused.disable_adapter(), pytest.warns(UserWarning, match="disabled"):
        torch.testing.assert_close(fused(x), model(x), rtol=0, atol=0)
    model.merge_adapter()
    fused.merge_adapter()
    _check_fallback(model, fused, x, "merged")
    model.unmerge_adapter()
    fused.unmerge_adapter()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_several_adapters_and_mixed_batches():
    model = _mlp_peft()
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["up", "mid", "down"]))
    _randomize_lora(model)
    fused = fuse_lora(copy.deepcopy(model))
    x = torch.randn(4, 40)
    # one active adapter at a time: fused, and switching adapters is honoured
    for name in ("default", "other"):
        model.set_adapter(name)
        fused.set_adapter(name)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)
    # several active adapters -> PEFT's path
    model.base_model.set_adapter(["default", "other"])
    fused.base_model.set_adapter(["default", "other"])
    _check_fallback(model, fused, x, "several adapters")
    # mixed-adapter batch (PEFT allows it in eval mode only) -> PEFT's path
    model.set_adapter("default")
    fused.set_adapter("default")
    model.eval()
    fused.eval()
    names = ["default", "other", "default", "__base__"]
    _check_fallback(model, fused, x, "adapter_names", adapter_names=names)


def test_dropout_trains_and_eval_matches_peft():
    model = _mlp_peft(lora_dropout=0.2)
    fused = _fused_copy(model, "triton")
    x = torch.randn(6, 40)
    fused.train()
    y1, y2 = fused(x), fused(x)
    assert not torch.equal(y1, y2), "dropout in train mode should give a fresh mask per call"
    y1.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fused.parameters() if p.grad is not None)
    model.eval()
    fused.eval()
    torch.testing.assert_close(fused(x), model(x), rtol=1e-5, atol=1e-5)


def test_register_fused_lora_builds_fused_layers():
    torch.manual_seed(0)
    config = register_fused_lora(LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    model = get_peft_model(MLP(), config)
    layers = [m for m in model.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    _randomize_lora(model)
    plain = unfuse_lora(copy.deepcopy(model))
    assert all(type(m) is PeftLoraLinear for m in plain.modules() if isinstance(m, PeftLoraLinear))
    x = torch.randn(3, 40)
    torch.testing.assert_close(model(x), plain(x), rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_lora("not a model")
    with pytest.raises(ValueError, match="backend must be one of"):
        fuse_lora(MLP(), backend="cuda")
    with pytest.warns(UserWarning, match="no PEFT LoRA Linear"):
        fuse_lora(MLP())
    with pytest.raises(TypeError, match="LoraConfig"):
        register_fused_lora(object())
