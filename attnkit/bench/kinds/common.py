"""What every kind's builders share: the device test, the attnkit backend, input tensors."""

from __future__ import annotations

import torch

from ..registry import Point

__all__ = ["on_cuda", "attnkit_backend", "qkv", "tensor_bytes"]


def on_cuda(point: Point) -> bool:
    return point.device.startswith("cuda")


def attnkit_backend(point: Point) -> str:
    # On the CPU the torch backend, never the Triton interpreter (tests may set TRITON_INTERPRET).
    return "triton" if on_cuda(point) else "torch"


def qkv(point: Point, requires_grad: bool, layout: str = "bhnd"):
    """Three ``[B, H, N, D]`` (or ``[B, N, H, D]`` for ``layout="bnhd"``) random tensors."""
    shape = ((point.batch, point.heads, point.n, point.d) if layout == "bhnd"
             else (point.batch, point.n, point.heads, point.d))
    return [torch.randn(shape, device=point.device, dtype=point.torch_dtype,
                        requires_grad=requires_grad) for _ in range(3)]


def tensor_bytes(point: Point, count: int) -> float:
    return count * point.batch * point.heads * point.n * point.d * point.elem
