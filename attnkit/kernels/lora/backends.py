"""The LoRA backends, in ``"auto"``'s priority order, and the op's one dispatch.

* :class:`~.cuda.CudaLoRA` — BGMV kernels for no-grad ``lora_batched`` decode batches;
* :class:`TritonLoRA` — the fused Triton kernels (``op.py``): CUDA tensors, rank <= 256;
* :class:`TorchLoRA` — PyTorch (``torch_impl.py``): any device, dtype and rank.

Both ops (``lora_linear``: one adapter; ``lora_batched``: one adapter per row) go through
:func:`run_lora` with a validated :class:`LoRACall`; each backend's ``run`` computes either.
Under ``"auto"``, a ``lora_linear`` call Triton can run goes to whichever of the fused kernel and
the unfused cuBLAS path (the torch backend) measured faster for its shape (``path.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..dispatch import TRITON_DTYPES, Backend, select_backend
from .cuda import CudaLoRA
from .path import choose_path, path_setting

__all__ = ["LoRACall", "BACKENDS", "TritonLoRA", "TorchLoRA", "select_lora_backend", "run_lora",
           "linear_backend", "MAX_TRITON_RANK"]

#: Largest rank the Triton kernels are built and tested for.
MAX_TRITON_RANK = 256


@dataclass(frozen=True)
class LoRACall:
    """A validated LoRA call, as the backends see it (all tensors on one device, one dtype).

    The first four fields are what the backends' reasons read; a call made of those alone (the
    dispatch tests, ``attnkit info``) can be asked about but not run.

    * ``x [T, in]``; ``rank`` r; ``needs_grad``: autograd must flow; ``batched``: a
      ``lora_batched`` call.
    * ``weight [out, in]``, ``bias [out] | None``.
    * ``lora_linear``: ``lora_a [r, in]``, ``lora_b [out, r]``, ``scaling``; ``dropout_p`` (0 when
      not training) and ``seed`` (``int | None``: each backend draws its own when ``None``).
    * ``lora_batched``: ``lora_a [n, r, in]``, ``lora_b [n, out, r]``, ``scalings [n]`` fp32,
      ``index [T]`` int64 in ``[-1, n)`` (-1: the base layer alone).
    """

    x: torch.Tensor
    rank: int
    needs_grad: bool
    batched: bool
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scaling: float = 1.0
    dropout_p: float = 0.0
    seed: int | None = None
    scalings: torch.Tensor | None = None
    index: torch.Tensor | None = None

    @property
    def tensor(self) -> torch.Tensor:
        return self.x

    @property
    def head_dim(self) -> int:
        return self.rank

    @property
    def batched_args(self) -> tuple:
        """``(x, weight, bias, lora_as, lora_bs, scalings, index)``: what every backend's
        ``lora_batched`` implementation takes."""
        return self.x, self.weight, self.bias, self.lora_a, self.lora_b, self.scalings, self.index


class TritonLoRA(Backend):
    """The fused Triton kernels: one GEMM per direction, dropout regenerated from a seed."""

    name = "triton"
    kind = "triton"
    dtypes = TRITON_DTYPES
    max_head_dim = MAX_TRITON_RANK
    head_dim_name = "rank"

    def special_reasons(self, call: LoRACall) -> list[str]:
        # supports_grad is per backend; only this backend's batched op lacks a backward
        if call.batched and call.needs_grad:
            return ["lora_batched's Triton kernels are inference-only (no autograd)"]
        return []

    def run(self, call: LoRACall) -> torch.Tensor:
        if call.batched:
            from .op import lora_batched_triton

            return lora_batched_triton(*call.batched_args)
        from .op import lora_linear_triton

        seed = None
        if call.dropout_p > 0.0:
            # a device tensor: drawing it on the device needs no host sync, and torch.compile
            # traces it without a graph break
            seed = (torch.randint(0, 2**31 - 1, (1,), device=call.x.device) if call.seed is None
                    else torch.tensor([call.seed], device=call.x.device, dtype=torch.int64))
        return lora_linear_triton(call.x, call.weight, call.bias, call.lora_a, call.lora_b,
                                  call.scaling, call.dropout_p, seed)


class TorchLoRA(Backend):
    """PyTorch GEMMs: any device, dtype and rank; the same saved tensors as the Triton op."""

    name = "torch"
    kind = "torch"

    def run(self, call: LoRACall) -> torch.Tensor:
        if call.batched:
            from .torch_impl import lora_batched_torch

            return lora_batched_torch(*call.batched_args)
        from .torch_impl import lora_linear_torch

        seed = None
        if call.dropout_p > 0.0:
            seed = int(torch.randint(0, 2**31 - 1, ())) if call.seed is None else call.seed
        return lora_linear_torch(call.x, call.weight, call.bias, call.lora_a, call.lora_b,
                                 call.scaling, call.dropout_p, seed)


BACKENDS: tuple[Backend, ...] = (CudaLoRA(), TritonLoRA(), TorchLoRA())
_TRITON, _TORCH = BACKENDS[1], BACKENDS[2]


def select_lora_backend(call: LoRACall, backend: str, op: str) -> Backend:
    """The backend that runs ``call`` (``backend``: ``"auto"`` or a name; ``op`` names the
    public function in messages)."""
    return select_backend(call, backend, BACKENDS, op=op)


def linear_backend(call: LoRACall, backend: str, choose=None) -> Backend:
    """The backend of a ``lora_linear`` call: fused (Triton) or unfused (torch / cuBLAS).

    A named backend (the argument, or ``ATTNKIT_BACKEND``) is taken as asked. Under ``"auto"``,
    ``ATTNKIT_LORA_PATH`` decides (``path.py``): ``cublas`` -> torch; ``fused`` -> Triton wherever
    it can run the call (CPU tensors too under ``TRITON_INTERPRET=1``), else auto's rule;
    ``auto`` -> auto's rule, and where that gives Triton, the measured faster of the two
    (``choose``: :func:`~.path.choose_path`, injectable for tests).
    """
    setting = path_setting()  # read (and a typo refused) whatever the backend
    if backend != "auto" or os.environ.get("ATTNKIT_BACKEND", "auto") not in ("", "auto"):
        return select_lora_backend(call, backend, "lora_linear")
    if setting == "cublas":
        return _TORCH
    if setting == "fused" and not _TRITON.not_supported_reasons(call):
        return _TRITON
    chosen = select_lora_backend(call, "auto", "lora_linear")
    if setting == "auto" and chosen is _TRITON:
        return _TRITON if (choose or choose_path)(call) == "fused" else _TORCH
    return chosen


def run_lora(call: LoRACall, backend: str) -> torch.Tensor:
    """Dispatch a validated call: ``y [T, out]``."""
    if not call.batched:
        return linear_backend(call, backend).run(call)
    return select_lora_backend(call, backend, "lora_batched").run(call)
