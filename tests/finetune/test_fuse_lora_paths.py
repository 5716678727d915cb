"""PEFT stays the oracle for both of ``lora_linear``'s paths: a ``fuse_lora`` model's outputs and
LoRA gradients match PEFT's with ``ATTNKIT_LORA_PATH=fused`` (the Triton kernels; the interpreter
on CPU) and ``=cublas`` (the unfused torch ops), and each forced path is the one that runs."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("peft")

from attnkit.finetune.peft_glue import fuse_lora  # noqa: E402
from attnkit.kernels.lora import backends, path  # noqa: E402
from tests.finetune.test_fuse_lora import _close, _lora_grads, _mlp_peft  # noqa: E402


@pytest.mark.parametrize("env, runs", [("fused", "triton"), ("cublas", "torch")])
@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["nodrop", "eval-dropout"])
def test_fused_and_cublas_paths_match_peft(monkeypatch, tmp_path, env, runs, dropout):
    monkeypatch.setenv("ATTNKIT_LORA_PATH", env)
    monkeypatch.setenv("ATTNKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("ATTNKIT_BACKEND", raising=False)
    monkeypatch.setattr(path, "CACHE", path.PathCache())
    ran = []
    for cls in (backends.TritonLoRA, backends.TorchLoRA):
        original = cls.run
        monkeypatch.setattr(cls, "run", lambda self, call, _o=original: ran.append(self.name)
                            or _o(self, call))
    model = _mlp_peft(lora_dropout=dropout)
    if dropout:
        model.eval()  # dropout masks differ by design; eval compares the same function
    fused = fuse_lora(copy.deepcopy(model))  # backend "auto": the env var decides
    x = torch.randn(2, 7, 40)
    y_ref, y = model(x), fused(x)
    assert ran and set(ran) == {runs}, ran
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y_ref.backward(dy)
    y.backward(dy)
    g_ref, g = _lora_grads(model), _lora_grads(fused)
    assert set(g) == set(g_ref) and g and all("lora_" in n for n in g)
    for name in g_ref:
        _close(g[name], g_ref[name], 1e-5, name)
