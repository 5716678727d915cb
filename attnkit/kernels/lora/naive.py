"""The float64 oracle of the LoRA ops: the formulas written the naive way.

Tests compare every backend against these (in float64, and in the inputs' own dtype to set the
error budget: flash-attention's rule, ``tests/harness.py``). Both are differentiable; the inputs
are cast to ``dtype`` first, so give leaves of that dtype when their gradients must not be
rounded back to another one.
"""

from __future__ import annotations

import torch

__all__ = ["lora_linear_naive", "lora_batched_naive"]


def lora_linear_naive(x, weight, lora_a, lora_b, scaling, bias=None, keep=None, dropout_p=0.0,
                      dtype=torch.float64) -> torch.Tensor:
    """``y [..., out] = x W^T + bias + s (keep * x / (1 - p)) A^T B^T`` in ``dtype``.

    ``x [..., in]``, ``weight [out, in]``, ``lora_a [r, in]``, ``lora_b [out, r]``,
    ``bias [out] | None``; ``keep`` (bool, x's shape, True = kept) is the dropout mask of
    probability ``dropout_p``, or ``None`` for no dropout.
    """
    x, weight, lora_a, lora_b = (t.to(dtype) for t in (x, weight, lora_a, lora_b))
    xd = x if keep is None else torch.where(keep, x / (1.0 - dropout_p), torch.zeros_like(x))
    y = x @ weight.t() + scaling * (xd @ lora_a.t()) @ lora_b.t()
    return y + bias.to(dtype) if bias is not None else y


def lora_batched_naive(x, weight, bias, lora_as, lora_bs, scalings, index,
                       dtype=torch.float64) -> torch.Tensor:
    """One row at a time: ``y[t] = W x[t] + bias + s[i] B[i] (A[i] x[t])``, ``i = index[t]``
    (``-1``: the base layer alone), in ``dtype``.

    ``x [T, in]``, ``weight [out, in]``, ``bias [out] | None``, ``lora_as [n, r, in]``,
    ``lora_bs [n, out, r]``, ``scalings``: ``n`` floats (a sequence or a tensor), ``index [T]``.
    """
    x, weight, lora_as, lora_bs = (t.to(dtype) for t in (x, weight, lora_as, lora_bs))
    scalings = [float(s) for s in scalings]
    rows = []
    for t in range(x.shape[0]):
        y = weight @ x[t]
        if bias is not None:
            y = y + bias.to(dtype)
        i = int(index[t])
        if i >= 0:
            y = y + scalings[i] * (lora_bs[i] @ (lora_as[i] @ x[t]))
        rows.append(y)
    if not rows:
        return x.new_zeros((0, weight.shape[0]))
    return torch.stack(rows)
