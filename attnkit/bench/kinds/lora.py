"""The LoRA kinds: attnkit's fused LoRA linear, its cuBLAS+addmm path, PEFT with and without the
fused layers, the unfused form, and the frozen base layer alone (the floor every LoRA row pays).

Kinds (``in x out``, rank): ``lora`` is square at the grid's hidden size and rank (4096, r 16 on
GPUs; 512 on the CPU); on GPU grids ``lora-r64`` (square, r 64), ``lora-mlp`` (``in`` to
``3.5 in``: 4096 x 14336, a Llama MLP's gate/up projection, at the grid's rank) and
``lora-mlp-r64``. Each runs fwd and fwd+bwd; every row records its peak memory. The FLOPs and
bytes of a row are the LoRA layer's (the frozen-base row's ``tflops`` therefore counts the
adapter's small share too: compare its time, not its rate).
"""

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

#: ``out / in`` of each LoRA kind (``lora-mlp``: 4096 -> 14336 = 3.5 x), by kind name.
_OUT_RATIO = {"lora": 1.0, "lora-r64": 1.0, "lora-mlp": 3.5, "lora-mlp-r64": 3.5}


def _out(point: Point) -> int:
    return int(point.hidden * _OUT_RATIO[point.kind])


def _lora_tensors(point: Point, requires_grad: bool):
    h, o, r, dt, dev = point.hidden, _out(point), point.rank, point.torch_dtype, point.device
    x = torch.randn(point.batch, point.n, h, device=dev, dtype=dt, requires_grad=requires_grad)
    w = torch.randn(o, h, device=dev, dtype=dt) / math.sqrt(h)
    a = (torch.randn(r, h, device=dev, dtype=dt) / math.sqrt(h)).requires_grad_(requires_grad)
    b = (torch.randn(o, r, device=dev, dtype=dt) * 0.01).requires_grad_(requires_grad)
    return x, w, a, b


def _build_lora_attnkit(point: Point, requires_grad: bool, backend: str | None = None) -> Workload:
    """``backend`` None: the fused kernel on GPUs (``triton``, not ``auto``'s measured choice, so the
    row is the kernel's), the torch backend on the CPU; ``"torch"``: the cuBLAS+addmm path."""
    from ...finetune.functional import lora_linear

    x, w, a, b = _lora_tensors(point, requires_grad)
    backend, scaling = backend or _attnkit_backend(point), 2.0
    return Workload(lambda: lora_linear(x, w, a, b, scaling, backend=backend), [x, a, b])


def _build_frozen_base(point: Point, requires_grad: bool) -> Workload:
    """The base layer alone, ``x W^T`` with W frozen: fwd+bwd computes ``dx`` only."""
    x, w, _, _ = _lora_tensors(point, requires_grad)
    return Workload(lambda: F.linear(x, w), [x])


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

    lin = torch.nn.Linear(point.hidden, _out(point), bias=False, device=point.device,
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
    tokens, h, o = point.batch * point.n, point.hidden, _out(point)
    return (tokens * (2 * h + o) * grad + h * o) * 4


def _lora_flops(p: Point) -> float:
    return lora_flops(p.batch * p.n, p.hidden, _out(p), p.rank, p.mode)


def _lora_bytes(p: Point) -> float:
    return lora_bytes(p.batch * p.n, p.hidden, _out(p), p.rank, p.elem, p.mode)


def _gpu_shape(rank: int | None):
    """A kind's ``point_shape``: on GPU grids the grid's hidden size and ``rank`` (None: the grid's);
    on the CPU no points (the square ``lora`` kind has rows for every implementation there)."""
    def shape(grid):
        if not grid.device.startswith("cuda"):
            return None
        return grid.lora_hidden, rank or grid.lora_rank
    return shape


_KINDS = {
    "lora": ("fused LoRA linear (x W^T + s x A^T B^T), square weight", None),
    "lora-r64": ("fused LoRA linear, square weight, rank 64", _gpu_shape(64)),
    "lora-mlp": ("fused LoRA linear, out = 3.5 x in (4096 x 14336: a Llama MLP's gate/up)", _gpu_shape(None)),
    "lora-mlp-r64": ("fused LoRA linear, out = 3.5 x in, rank 64", _gpu_shape(64)),
}

for _name, (_description, _shape) in _KINDS.items():
    _kind = register_kind(Kind(_name, "lora", _description, _lora_flops, _lora_bytes, 1.0,
                               uses_head_dim=False))
    if _shape is not None:
        _kind.point_shape = _shape  # read by bench.sweep.build_points
    register_impl(_name, Impl("attnkit", _build_lora_attnkit, False, _predict_lora, tier=0))
    register_impl(_name, Impl("attnkit-cublas", functools.partial(_build_lora_attnkit, backend="torch"),
                              False, _predict_lora, tier=0))
    register_impl(_name, Impl("attnkit-peft", functools.partial(_build_lora_peft, True), False,
                              _predict_lora, tier=0))
    register_impl(_name, Impl("frozen-base", _build_frozen_base, False, _predict_lora, tier=0))
    register_impl(_name, Impl("torch-unfused", _build_lora_unfused, True, _predict_lora))
    register_impl(_name, Impl("peft", functools.partial(_build_lora_peft, False), True, _predict_lora))
