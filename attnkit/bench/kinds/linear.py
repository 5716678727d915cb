"""The linear-attention kind: attnkit, the chunked torch form, the O(N^2) form, fla."""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..flops import attention_bytes, linear_attention_flops
from ..registry import Impl, Kind, Point, Unavailable, Workload, register_impl, register_kind
from .common import attnkit_backend as _attnkit_backend
from .common import on_cuda as _on_cuda
from .common import qkv as _qkv
from .common import tensor_bytes as _tensor_bytes


def _elu1(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x.float()) + 1


def _build_linear_attnkit(backend: str | None, point: Point, requires_grad: bool) -> Workload:
    from ...attn.linear import linear_attention

    if backend == "torch" and not _on_cuda(point):
        raise Unavailable("on the CPU attnkit itself runs the torch backend (the 'attnkit' row)")
    chosen = backend or _attnkit_backend(point)
    q, k, v = _qkv(point, requires_grad)
    return Workload(lambda: linear_attention(q, k, v, feature_map="elu1", causal=True, backend=chosen),
                    [q, k, v])


def _build_linear_quadratic(point: Point, requires_grad: bool) -> Workload:
    """The O(N^2) form ``(phi(q) phi(k)^T * causal) v / row sums``: what linear attention avoids."""
    q, k, v = _qkv(point, requires_grad)

    def fn():
        fq, fk = _elu1(q), _elu1(k)
        a = (fq @ fk.transpose(-1, -2)).tril()
        o = (a @ v.float()) / (a.sum(-1, keepdim=True) + 1e-6)
        return o.to(q.dtype)

    return Workload(fn, [q, k, v])


def _build_fla(point: Point, requires_grad: bool) -> Workload:
    if importlib.util.find_spec("fla") is None:
        raise Unavailable("flash-linear-attention (fla) is not installed")
    if not _on_cuda(point):
        raise Unavailable("flash-linear-attention needs a CUDA device")
    try:
        from fla.ops.linear_attn import chunk_linear_attn
    except (ImportError, OSError) as e:
        raise Unavailable(f"flash-linear-attention is installed but does not import: {e}") from None

    q, k, v = _qkv(point, requires_grad, layout="bnhd")
    kwargs = {"scale": 1.0, "normalize": True}
    if "head_first" in inspect.signature(chunk_linear_attn).parameters:
        kwargs["head_first"] = False  # older fla defaults to [B, H, T, D]; ours are [B, T, H, D]

    def fn():
        fq, fk = _elu1(q).to(q.dtype), _elu1(k).to(k.dtype)  # the same map, outside the kernel
        out = chunk_linear_attn(fq, fk, v, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    return Workload(fn, [q, k, v])


def _predict_linear(quadratic: bool) -> Callable[[Point], float]:
    def predict(point: Point) -> float:
        grad = 1 if point.mode == "fwd" else 2
        base = _tensor_bytes(point, 8 * grad) * (4 / point.elem)  # fp32 copies of the mapped inputs
        return base + (2 * 4 * point.batch * point.heads * point.n**2 * grad if quadratic else 0)
    return predict


def _linear_flops(p: Point) -> float:
    return linear_attention_flops(p.batch, p.heads, p.n, p.d, p.d, p.mode)


def _linear_bytes(p: Point) -> float:
    return attention_bytes(p.batch, p.heads, p.n, p.d, p.elem, p.mode)


register_kind(Kind("linear", "linear_attention", "causal linear attention, elu+1 feature map",
                   _linear_flops, _linear_bytes, 1.0))
register_impl("linear", Impl("attnkit", functools.partial(_build_linear_attnkit, None), False,
                             _predict_linear(False), tier=0))
register_impl("linear", Impl("torch-chunked", functools.partial(_build_linear_attnkit, "torch"), True,
                             _predict_linear(False)))
register_impl("linear", Impl("torch-quadratic", _build_linear_quadratic, True, _predict_linear(True)))
# tier 2 with the compiled baselines: fla autotunes on its first call, which the budget's
# compile reserve must cover.
register_impl("linear", Impl("fla", _build_fla, True, _predict_linear(False), tier=2))
