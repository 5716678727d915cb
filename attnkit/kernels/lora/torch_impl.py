"""The pure-PyTorch LoRA backend (CPU path, and any device when forced): same math as the kernels.

Forward ``y = addmm(bias, x, W^T) + su B^T`` with ``su = s drop(x) A^T``; backward
``gs = s dy B``, ``dx = dy W + mask/(1-p) * (gs A)``, ``dA = gs^T drop(x)``, ``dB = dy^T su``.
It saves the same tensors as the Triton op: ``x``, ``su`` and the dropout seed, never a dropped
copy of ``x``.

Dropout mask: ``torch.rand(x.shape, generator=Generator(x.device).manual_seed(seed)) >= p``,
regenerated in backward from the same seed. It is NOT the Triton kernels' Philox mask (that one is
``tl.rand(seed, t * in + k)``), so the two backends drop different elements for the same seed;
each backend uses one mask for its own forward and backward, which is what correctness needs.
"""

from __future__ import annotations

import torch

__all__ = ["lora_linear_torch", "lora_batched_torch", "dropout_keep_mask"]


def dropout_keep_mask(shape, seed: int, p: float, device) -> torch.Tensor:
    """Boolean keep mask of the torch backend for ``x`` of ``shape`` (True = kept)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(shape, generator=gen, device=device) >= p


def _dropped(x: torch.Tensor, p: float, seed) -> torch.Tensor:
    """``drop(x)`` with the ``1 / (1 - p)`` scale (a transient: never saved)."""
    if seed is None or p == 0.0:
        return x
    keep = dropout_keep_mask(x.shape, seed, p, x.device)
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype, device=x.device))


class _LoRALinearTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        # x [T, in], weight [out, in], bias [out] | None, lora_a [r, in], lora_b [out, r]
        su = torch.mm(_dropped(x, dropout_p, seed), lora_a.t()).mul_(scaling)  # [T, r]
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.addmm_(su, lora_b.t())  # [T, out]
        ctx.save_for_backward(x, weight, lora_a, lora_b, su)
        ctx.scaling, ctx.dropout_p, ctx.seed, ctx.has_bias = scaling, dropout_p, seed, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, su = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        p, seed = ctx.dropout_p, ctx.seed
        gs = torch.mm(dy, lora_b).mul_(ctx.scaling)  # s dy B: [T, r]
        dx = dw = dbias = None
        if need_x:
            lora_dx = torch.mm(gs, lora_a)  # [T, in]
            if seed is not None and p > 0.0:
                keep = dropout_keep_mask(x.shape, seed, p, x.device)
                lora_dx = torch.where(keep, lora_dx * (1.0 / (1.0 - p)), 0.0).to(lora_dx.dtype)
            dx = torch.addmm(lora_dx, dy, weight)
        da = torch.mm(gs.t(), _dropped(x, p, seed))  # [r, in]
        db = torch.mm(dy.t(), su)  # [out, r]
        if need_w:
            dw = torch.mm(dy.t(), x)
        if need_b and ctx.has_bias:
            dbias = dy.sum(0, dtype=torch.float32).to(dy.dtype)
        return dx, dw, dbias, da, db, None, None, None


def lora_linear_torch(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0, seed=None):
    """``y [T, out] = x W^T + bias + s drop(x) A^T B^T`` for ``x [T, in]``; ``seed``: int | None."""
    return _LoRALinearTorch.apply(x, weight, bias, lora_a, lora_b, float(scaling),
                                  float(dropout_p), None if seed is None else int(seed))


def lora_batched_torch(x, weight, bias, lora_as, lora_bs, scalings, index):
    """Per-adapter loop of :func:`attnkit.kernels.lora.op.lora_batched_triton` (same shapes)."""
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    for i in torch.unique(index).tolist():
        if i < 0:
            continue
        rows = (index == i).nonzero().squeeze(1)
        su = torch.mm(x.index_select(0, rows), lora_as[i].t()).mul_(scalings[i].item())
        y.index_add_(0, rows, torch.mm(su, lora_bs[i].t()))
    return y
