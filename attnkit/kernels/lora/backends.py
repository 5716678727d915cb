"""The LoRA backends, in ``"auto"``'s priority order, and the op's one dispatch.

* :class:`~.cuda.CudaLoRA` — BGMV kernels for no-grad ``lora_batched`` decode batches;
* :class:`TritonLoRA` — the fused Triton kernels (``op.py``): CUDA tensors, rank <= 256;
* :class:`TorchLoRA` — PyTorch (``torch_impl.py``): any device, dtype and rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dispatch import TRITON_DTYPES, Backend, select_backend
from .cuda import CudaLoRA

__all__ = ["LoRACall", "BACKENDS", "select_lora_backend", "MAX_TRITON_RANK"]

#: Largest rank the Triton kernels are built and tested for.
MAX_TRITON_RANK = 256


@dataclass(frozen=True)
class LoRACall:
    """What a backend needs to know to accept or reject a call: ``x [T, in]``, the rank, whether
    autograd is needed, and whether it is a multi-adapter (``lora_batched``) call."""

    x: torch.Tensor
    rank: int
    needs_grad: bool
    batched: bool

    @property
    def tensor(self) -> torch.Tensor:
        return self.x

    @property
    def head_dim(self) -> int:
        return self.rank


class TritonLoRA(Backend):
    name = "triton"
    kind = "triton"
    dtypes = TRITON_DTYPES
    max_head_dim = MAX_TRITON_RANK
    head_dim_name = "rank"

    def special_reasons(self, call: LoRACall) -> list[str]:
        if call.batched and call.needs_grad:
            return ["lora_batched's Triton kernels are inference-only (no autograd)"]
        return []


class TorchLoRA(Backend):
    name = "torch"
    kind = "torch"


BACKENDS: tuple[Backend, ...] = (CudaLoRA(), TritonLoRA(), TorchLoRA())


def select_lora_backend(call: LoRACall, backend: str, op: str) -> Backend:
    return select_backend(call, backend, BACKENDS, op=op)
