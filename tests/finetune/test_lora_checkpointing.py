"""Gradient checkpointing (transformers' ``gradient_checkpointing_enable``, what the Trainer's
``--gradient-checkpointing`` calls) through the fused LoRA layers, on both backends: with and without
checkpointing every LoRA gradient is the same, against PEFT itself without dropout and against the
uncheckpointed fused run with dropout (the recomputed forward draws the same dropout seed)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from attnkit.finetune.peft_glue import FusedLoraLinear, fuse_lora  # noqa: E402

CKPT = {"use_reentrant": False}  # as attnkit finetune passes it


def _tiny_peft(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      initializer_range=0.2)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    with torch.no_grad():  # random B too, so that every LoRA factor gets a non-trivial gradient
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    return model


def _grads(model, checkpointing: bool, seed: int = 3):
    """LoRA gradients of the LM loss on one fixed batch, and how often each fused layer ran."""
    if checkpointing:  # transformers >= 5.2x calls it activation checkpointing
        base = model.get_base_model()
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(CKPT)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CKPT)
    model.train()
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules()
             if isinstance(m, FusedLoraLinear)]
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(seed)
    model(input_ids=ids, labels=ids).loss.backward()
    for h in hooks:
        h.remove()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, len(calls)


def _check(got, want, name):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert scale > 0 and err <= 1e-5 * scale, f"{name}: max error {err:.3e} vs max |ref| {scale:.3e}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpointed_grads_match_peft(backend):
    peft_model = _tiny_peft(dropout=0.0)
    fused = fuse_lora(copy.deepcopy(peft_model), backend=backend)
    want, _ = _grads(peft_model, checkpointing=False)
    got, calls = _grads(fused, checkpointing=True)
    # recomputed in backward; non-reentrant checkpointing stops early, once the tensors backward
    # needs are back (measured: one of the four fused layers is not run again)
    assert 4 < calls <= 2 * 4, calls
    assert set(got) == set(want) and len(want) == 8 and all("lora_" in n for n in want)
    for name in want:
        _check(got[name], want[name], name)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_checkpointed_dropout_draws_the_same_masks(backend):
    model = fuse_lora(_tiny_peft(dropout=0.3), backend=backend)
    plain = copy.deepcopy(model)
    want, calls_plain = _grads(plain, checkpointing=False)
    got, calls = _grads(model, checkpointing=True)
    assert calls_plain == 4 and calls > 4
    for name in want:
        _check(got[name], want[name], name)
    if backend == "triton":
        return  # the interpreter is slow; the seed's effect is the same on both backends
    other, _ = _grads(copy.deepcopy(plain), checkpointing=False, seed=4)
    assert any((other[n] - want[n]).abs().max() > 1e-3 for n in want), "another seed, other masks"
