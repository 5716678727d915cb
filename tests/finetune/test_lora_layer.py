"""``LoRALinear``: the standalone layer, its merge/unmerge and its argument checks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnkit.finetune import LoRALinear
from attnkit.kernels.lora.naive import lora_linear_naive


def _layer(backend, device, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    base = nn.Linear(40, 24).to(device=device, dtype=dtype)
    layer = LoRALinear(base, kw.pop("r", 4), kw.pop("alpha", 8.0), backend=backend, **kw)
    with torch.no_grad():
        layer.lora_B.normal_()  # zero-initialised; make the LoRA path count
    return layer


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_forward_and_grads_vs_formula(backend, rslora, device):
    layer = _layer(backend, device, use_rslora=rslora)
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad
    scaling = 8.0 / (math.sqrt(4) if rslora else 4)
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(3, 5, 40, device=device)
    y = layer(x)
    a, bb = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    want = lora_linear_naive(x, layer.base.weight, a, bb, scaling, layer.base.bias)  # float64
    # fp32 (IEEE on the CPU): a tighter bound than the harness's 2e-5 x factor x max(1, |y|)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    want.backward(dy.double())
    torch.testing.assert_close(layer.lora_A.grad.double(), a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad.double(), bb.grad, rtol=1e-4, atol=1e-4)


def test_fresh_layer_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    layer = LoRALinear(base, 4, 8.0, backend="torch")
    x = torch.randn(7, 40)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_unmerge(dtype, device):
    layer = _layer("triton", device, dtype).eval()
    x = torch.randn(6, 40, dtype=dtype, device=device)
    w0 = layer.base.weight.clone()
    y = layer(x)
    layer.merge()
    assert layer.merged
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(layer(x), y, **tol)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base.weight, w0, **tol)
    torch.testing.assert_close(layer(x), y, **tol)


def test_dropout_only_in_train_mode(device):
    layer = _layer("triton", device, dropout=0.5)
    x = torch.randn(8, 40, device=device)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        (dict(r=0), ValueError, ["r must be an int >= 1", "0"]),
        (dict(r=2.5), ValueError, ["r must be an int", "2.5"]),
        (dict(alpha=float("nan")), ValueError, ["alpha", "nan"]),
        (dict(dropout=1.0), ValueError, ["dropout", "[0, 1)", "1.0"]),
        (dict(base=nn.Conv1d(4, 4, 1)), TypeError, ["base", "nn.Linear", "Conv1d"]),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    args = dict(base=nn.Linear(8, 8), r=2, alpha=4.0)
    args.update(kwargs)
    with pytest.raises(exc) as info:
        LoRALinear(**args)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_import_is_light_and_peft_names_resolve_lazily():
    import subprocess
    import sys

    code = (
        "import sys, attnkit.finetune as ft\n"
        "heavy = [m for m in ('peft', 'transformers', 'triton') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from attnkit.finetune.peft_glue import fuse_lora\n"
        "assert ft.fuse_lora is fuse_lora\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_backend_is_refused_when_the_layer_is_built_not_at_its_first_forward():
    base = torch.nn.Linear(8, 6)
    with pytest.raises(ValueError, match=r"backend must be one of 'auto', 'cuda', 'triton', 'torch', "
                                         r"got 'bogus'"):
        LoRALinear(base, 2, 4.0, backend="bogus")
    with pytest.raises(TypeError, match="backend must be a str, got int"):
        LoRALinear(base, 2, 4.0, backend=3)
