"""``LoRALinear``: a standalone LoRA layer around an ``nn.Linear``, on the fused kernels."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..kernels.dispatch import check_backend_name
from ..kernels.lora.backends import BACKENDS
from .functional import lora_linear

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / r) * dropout(x) A^T B^T``, computed as one fused GEMM.

    Args:
        base: the ``nn.Linear`` to adapt (``weight [out, in]``); its parameters are frozen
            (``requires_grad_(False)``); set them trainable again to train them too.
        r: rank, ``>= 1`` (``<= 256`` on the Triton backend).
        alpha: LoRA alpha; the scaling is ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
        dropout: dropout probability on the LoRA input (train mode only).
        backend: ``"auto"``, ``"triton"`` or ``"torch"``.

    Parameters: ``lora_A [r, in]`` (Kaiming-uniform, as nn.Linear and PEFT), ``lora_B [out, r]``
    (zeros, so a fresh layer equals ``base``). Input ``[..., in]``, output ``[..., out]``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1 (the LoRA rank), got {r!r}")
        if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        self.backend = check_backend_name(backend, BACKENDS)
        self.base = base
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.r, self.alpha, self.dropout, self.use_rslora = r, alpha, float(dropout), use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return lora_linear(
            x, self.base.weight, self.lora_A, self.lora_B, self.scaling, self.base.bias,
            self.dropout, training=self.training, backend=self.backend,
        )

    def _delta(self) -> torch.Tensor:
        """``scaling * B A`` ``[out, in]``, formed in fp32 then cast to the base weight's dtype."""
        delta = (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling
        return delta.to(self.base.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into ``base.weight`` (inference); the forward is then ``base`` alone."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing done", stacklevel=2)
            return
        self.base.weight.add_(self._delta())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the base dtype's rounding)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing done", stacklevel=2)
            return
        self.base.weight.sub_(self._delta())
        self.merged = False

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"merged={self.merged}")
