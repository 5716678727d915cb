"""The linear-attention decode step on attnkit's CUDA kernel (``attnkit/csrc/linear_decode.cu``):
a built-in feature map (fp16/bf16/fp32, ``Dk <= 512``, ``Dv <= 512``, ``Dv % 4 == 0``), no grad."""

from __future__ import annotations

import torch

from ..cuda_ext import extension_reason
from .feature_maps import FEATURES

__all__ = ["linear_step_reasons", "linear_attention_step_cuda"]

LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LINEAR_MAX_DIM = 512


def _device_reason(t: torch.Tensor) -> str | None:
    if t.is_cuda:
        return None
    return f"tensors are on {t.device}; the CUDA kernels need CUDA tensors"


def linear_step_reasons(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map,
                        state=None) -> list[str]:
    """Why :func:`linear_attention_step_cuda` cannot take this step (empty list: it can).

    ``q [B, Hq, Dk]``, ``k [B, Hkv, Dk]``, ``v [B, Hkv, Dv]`` as validated by
    :func:`attnkit.attn.linear.linear_attention_step` (the one-token axis squeezed).
    """
    reasons = []
    where = _device_reason(q)
    if where:
        reasons.append(where)
    if q.dtype not in LINEAR_DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)")
    if not (isinstance(feature_map, str) and feature_map in FEATURES):
        reasons.append("only the built-in feature maps (elu1, relu, identity) are fused into the kernel")
    dk, dv = q.shape[-1], v.shape[-1]
    if dk > LINEAR_MAX_DIM:
        reasons.append(f"Dk = {dk} is above the maximum of {LINEAR_MAX_DIM}")
    if dv > LINEAR_MAX_DIM or dv % 4:
        reasons.append(f"Dv = {dv} is not supported (a multiple of 4, at most {LINEAR_MAX_DIM})")
    tensors = [q, k, v] + ([t for t in state if isinstance(t, torch.Tensor)] if state is not None else [])
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        reasons.append("the CUDA step has no backward (inference only)")
    if not reasons:
        ext = extension_reason()
        if ext:
            reasons.append(ext)
    return reasons


def linear_attention_step_cuda(q, k, v, s, z, feature_map: str, normalize: bool, eps: float,
                               scale: float):
    """One fused decode step. ``q [B, Hq, Dk]``, ``k [B, Hkv, Dk]``, ``v [B, Hkv, Dv]``,
    ``s [B, Hkv, Dk, Dv]`` / ``z [B, Hkv, Dk]`` (``None``: zeros). Returns
    ``(o [B, Hq, Dv] in q's dtype, s', z')`` with the new state in float32 (new tensors)."""
    B, Hkv, dk = k.shape
    if s is None:
        s = q.new_zeros((B, Hkv, dk, v.shape[-1]), dtype=torch.float32)
        z = q.new_zeros((B, Hkv, dk), dtype=torch.float32)
    return torch.ops.attnkit_cuda.linear_decode_step(
        q, k, v, s.float(), z.float(), FEATURES[feature_map], bool(normalize), float(eps),
        float(scale),
    )
