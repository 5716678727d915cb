"""The LoRA kind: attnkit's fused LoRA linear, PEFT with and without it, the unfused form."""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

from ..flops import lora_bytes, lora_flops
from ..registry import Impl, Kind, Point, Unavailable, Workload, register_impl, register_kind
from .common import attnkit_backend as _attnkit_backend

__all__ = ["LORA_HIDDEN_RANK"]

#: LoRA shapes (hidden size, rank) on each device type.
LORA_HIDDEN_RANK = {"cuda": (4096, 16), "cpu": (512, 16)}


def _lora_tensors(point: Point, requires_grad: bool):
    h, r, dt, dev = point.hidden, point.rank, point.torch_dtype, point.device
    x = torch.randn(point.batch, point.n, h, device=dev, dtype=dt, requires_grad=requires_grad)
    w = torch.randn(h, h, device=dev, dtype=dt) / math.sqrt(h)
    a = (torch.randn(r, h, device=dev, dtype=dt) / math.sqrt(h)).requires_grad_(requires_grad)
    b = (torch.randn(h, r, device=dev, dtype=dt) * 0.01).requires_grad_(requires_grad)
    return x, w, a, b


def _build_lora_attnkit(point: Point, requires_grad: bool) -> Workload:
    from ...finetune.functional import lora_linear

    x, w, a, b = _lora_tensors(point, requires_grad)
    backend, scaling = _attnkit_backend(point), 2.0
    return Workload(lambda: lora_linear(x, w, a, b, scaling, backend=backend), [x, a, b])


def _build_lora_unfused(point: Point, requires_grad: bool) -> Workload:
    x, w, a, b = _lora_tensors(point, requires_grad)
    return Workload(lambda: F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b), [x, a, b])


def _peft_model(point: Point):
    if importlib.util.find_spec("peft") is None:
        raise Unavailable("peft is not installed (pip install peft)")
    from peft import LoraConfig, get_peft_model

    class _Proj(torch.nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.proj = lin

        def forward(self, x):
            return self.proj(x)

    lin = torch.nn.Linear(point.hidden, point.hidden, bias=False, device=point.device,
                          dtype=point.torch_dtype)
    config = LoraConfig(r=point.rank, lora_alpha=2 * point.rank, lora_dropout=0.0,
                        target_modules=["proj"])
    # PEFT makes adapters fp32 by default (autocast_adapter_dtype); the other LoRA rows run
    # their adapters in the point's dtype, so this one does too (same work, like for like).
    return get_peft_model(_Proj(lin), config, autocast_adapter_dtype=False)


def _build_lora_peft(fused: bool, point: Point, requires_grad: bool) -> Workload:
    model = _peft_model(point)
    if fused:
        from ...finetune import fuse_lora

        fuse_lora(model, backend=_attnkit_backend(point))
    x = torch.randn(point.batch, point.n, point.hidden, device=point.device, dtype=point.torch_dtype,
                    requires_grad=requires_grad)
    params = [x] + [p for p in model.parameters() if p.requires_grad]
    if not requires_grad:
        model.requires_grad_(False)
    return Workload(lambda: model(x), params)


def _predict_lora(point: Point) -> float:
    grad = 1 if point.mode == "fwd" else 2
    return (3 * point.batch * point.n * point.hidden * grad + point.hidden**2) * 4


def _lora_flops(p: Point) -> float:
    return lora_flops(p.batch * p.n, p.hidden, p.hidden, p.rank, p.mode)


def _lora_bytes(p: Point) -> float:
    return lora_bytes(p.batch * p.n, p.hidden, p.hidden, p.rank, p.elem, p.mode)


register_kind(Kind("lora", "lora", "fused LoRA linear (x W^T + s x A^T B^T), square weight",
                   _lora_flops, _lora_bytes, 1.0, uses_head_dim=False))
register_impl("lora", Impl("attnkit", _build_lora_attnkit, False, _predict_lora, tier=0))
register_impl("lora", Impl("attnkit-peft", functools.partial(_build_lora_peft, True), False,
                           _predict_lora, tier=0))
register_impl("lora", Impl("torch-unfused", _build_lora_unfused, True, _predict_lora))
register_impl("lora", Impl("peft", functools.partial(_build_lora_peft, False), True, _predict_lora))
