"""``lora_batched`` on attnkit's CUDA BGMV kernels (``attnkit/csrc/lora_bgmv.cu``): decode batches
of at most :data:`MAX_LORA_ROWS` rows, fp16/bf16, rank <= 512, no autograd."""

from __future__ import annotations

import torch

from ..cuda_ext import extension_reason
from ..dispatch import Backend

__all__ = ["CudaLoRA", "lora_batched_cuda", "MAX_LORA_ROWS", "MAX_LORA_RANK"]

DTYPES = (torch.float16, torch.bfloat16)
#: Rows up to which the per-row BGMV kernels beat a grouped GEMM (decode batches).
MAX_LORA_ROWS = 256
MAX_LORA_RANK = 512


class CudaLoRA(Backend):
    """BGMV shrink/expand (``attnkit/csrc/lora_bgmv.cu``) for ``lora_batched`` decode batches.

    Takes an ``attnkit.kernels.lora.backends.LoRACall``; its reasons read ``x [T, in]``,
    ``rank``, ``needs_grad`` and ``batched``, and only ``lora_batched`` calls reach ``run``.
    """

    name = "cuda"
    kind = "cuda"
    dtypes = DTYPES
    max_head_dim = MAX_LORA_RANK
    head_dim_name = "rank"
    supports_grad = False

    def special_reasons(self, call) -> list[str]:
        reasons = [] if call.batched else ["only lora_batched (multi-adapter decode) has a CUDA kernel"]
        if call.x.shape[0] > MAX_LORA_ROWS:
            reasons.append(
                f"{call.x.shape[0]} rows is not a decode batch (the CUDA kernels take at most "
                f"{MAX_LORA_ROWS}; larger batches go to the Triton grouped kernel)"
            )
        return reasons

    def extra_reasons(self, call) -> list[str]:
        ext = extension_reason()  # only now: this may compile the extension (first use)
        return [ext] if ext else []

    def run(self, call) -> torch.Tensor:
        return lora_batched_cuda(*call.batched_args)


def lora_batched_cuda(x, weight, bias, lora_as, lora_bs, scalings, index):
    """``y [T, out] = x W^T + bias + s[i] B[i] A[i] x`` per row, ``i = index[t]`` (-1: none).

    ``x [T, in]``, ``weight [out, in]``, ``lora_as [n, r, in]``, ``lora_bs [n, out, r]``,
    ``scalings [n]`` fp32, ``index [T]`` int64. The base product runs on cuBLAS (rounded to x's
    dtype); the LoRA term is computed in fp32 and added to it with one more rounding.
    """
    base = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    ops = torch.ops.attnkit_cuda
    u = ops.lora_shrink(x, lora_as, scalings, index)  # [T, r] fp32, scaled
    return ops.lora_expand(base, lora_bs, u, index)
