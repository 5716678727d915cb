"""The ``"cuda"`` attention backend: split-KV decode attention (``attnkit/csrc/decode_attention.cu``).

It declares decode-shaped calls only — at most :data:`MAX_DECODE_QUERIES` query tokens per
sequence against a KV cache, CUDA tensors, fp16/bf16, ``D`` in {64, 128, 256}, no autograd, band
patterns (Dense/Causal/SlidingWindow), a padded batch (an optional ``valid_keys``; not packed
``cu_seqlens``) — and checks what cannot be declared: K/V with a unit stride on ``D`` and 16-byte
aligned rows, and the extension itself (compiled on first use, :mod:`attnkit.kernels.cuda_ext`,
only once every other check passed, so CPU calls never trigger it).
"""

from __future__ import annotations

import torch

from ..cuda_ext import COMPILING_REASON, extension_reason
from ..dispatch import Backend
from .call import AttentionCall
from .spec import Band

__all__ = ["CudaDecodeBackend", "cuda_decode_attention", "MAX_DECODE_QUERIES", "HEAD_DIMS"]

#: Query tokens per sequence up to which a call counts as decoding (speculative decoding drafts
#: included); longer calls are prefill, which the Triton flash kernel does better. The Triton
#: split-KV decode backend uses the same bound.
MAX_DECODE_QUERIES = 16
HEAD_DIMS = (64, 128, 256)



def _kv_layout_reasons(k: torch.Tensor, v: torch.Tensor) -> list[str]:
    """The decode kernel copies K/V rows with 16-byte cp.async: unit stride on D, the other
    strides multiples of 8 elements, 16-byte aligned base pointers."""
    reasons = []
    for name, t in (("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            reasons.append(f"{name} has stride {t.stride(-1)} on D (the CUDA kernel needs 1)")
        elif any(s % 8 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            reasons.append(
                f"{name} is not 16-byte aligned (strides {tuple(t.stride())}, pointer offset "
                f"{t.data_ptr() % 16}); the CUDA kernel loads 16-byte vectors"
            )
    return reasons


class CudaDecodeBackend(Backend):
    """Split-KV decode attention on attnkit's CUDA kernel."""

    name = "cuda"
    kind = "cuda"
    dtypes = (torch.float16, torch.bfloat16)
    head_dims = HEAD_DIMS
    supports_grad = False
    max_queries = MAX_DECODE_QUERIES
    packed = False
    spec_kinds = ("band",)

    def special_reasons(self, call: AttentionCall) -> list[str]:
        if call.q.shape[0] > 65535:  # the batch is the grid's z dimension
            return [f"batch size {call.q.shape[0]} is above the CUDA grid limit of 65535"]
        return []

    def extra_reasons(self, call: AttentionCall) -> list[str]:
        if torch.compiler.is_compiling():
            return [COMPILING_REASON]  # before data_ptr(), which cannot be traced
        reasons = _kv_layout_reasons(call.k, call.v)
        if not reasons:  # only now: this may compile the extension (first use)
            ext = extension_reason()
            if ext:
                reasons.append(ext)
        return reasons

    def run(self, call: AttentionCall):
        wl, wr = call.spec.offsets()
        return torch.ops.attnkit_cuda.decode_attention(
            call.q, call.k, call.v, None, call.valid_keys, call.scale, wl, wr, 0
        )


def cuda_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_seqlens: torch.Tensor | None = None,
    *,
    pattern=None,
    scale: float | None = None,
    num_splits: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention against a KV cache with per-sequence lengths (the Hugging Face decode path).

    Args:
        q: ``[B, Hq, Nq, D]`` new query tokens (``Nq <= 16``), fp16/bf16 on a GPU, D in {64, 128, 256}.
        k_cache, v_cache: ``[B, Hkv, Nmax, D]`` (any strides with a unit stride on D, 16-byte
            aligned rows; ``[B, N, H, D]`` caches viewed as ``[B, H, N, D]`` work in place).
        cache_seqlens: int ``[B]``: sequence ``b`` holds keys ``[0, cache_seqlens[b])`` and its
            queries sit at the last ``Nq`` of those positions (bottom-right aligned to its own
            length). ``None``: every sequence is ``Nmax`` long.
        pattern: Dense (default), Causal or SlidingWindow.
        scale: defaults to ``D ** -0.5``.
        num_splits: key splits (0 = chosen to fill the GPU in one wave).

    Returns:
        ``(o [B, Hq, Nq, D] in q's dtype, lse [B, Hq, Nq] fp32)``; ``o = 0``, ``lse = -inf`` for a
        query that sees no key.

    Raises:
        ValueError / TypeError naming the argument; RuntimeError when the extension is unavailable.
    """
    from ...attn.patterns import as_pattern

    pattern = as_pattern(pattern)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if q.shape[2] > MAX_DECODE_QUERIES:
        raise ValueError(f"q has {q.shape[2]} query tokens; at most {MAX_DECODE_QUERIES} are accepted")
    spec = pattern.compile(q.shape[2], k_cache.shape[2], q.device)
    if not isinstance(spec, Band):
        raise ValueError(f"pattern must be Dense, Causal or SlidingWindow, got {pattern!r}")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dtype.is_floating_point:
            raise TypeError("cache_seqlens must be an integer tensor [B]")
        if tuple(cache_seqlens.shape) != (q.shape[0],):
            raise ValueError(
                f"cache_seqlens must have shape [{q.shape[0]}], got {tuple(cache_seqlens.shape)}"
            )
    if not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0, got {num_splits!r}")
    reason = extension_reason()
    if reason:
        raise RuntimeError(reason)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    wl, wr = spec.offsets()
    return torch.ops.attnkit_cuda.decode_attention(
        q, k_cache, v_cache, cache_seqlens, None, scale, wl, wr, num_splits
    )
