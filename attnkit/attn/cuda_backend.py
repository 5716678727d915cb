"""The ``"cuda"`` backends: attnkit's CUDA C++ kernels (``attnkit/csrc``) behind the dispatch.

Each backend declares what it takes and gives a reason for everything else, so ``"auto"`` can
try it first and move on (to Triton, then torch) without surprises:

* :class:`CudaDecodeBackend` (``attnkit.attention``): decode-shaped calls only — at most
  :data:`MAX_DECODE_QUERIES` query tokens per sequence against a KV cache, CUDA tensors, fp16/bf16,
  ``D`` in {64, 128, 256}, no autograd, Dense/Causal/SlidingWindow, a padded batch (an optional
  ``valid_keys``; not packed ``cu_seqlens``), K/V with a unit stride on ``D`` and 16-byte
  aligned rows.
* :func:`linear_step_reasons` / :func:`linear_attention_step_cuda`: the linear-attention decode
  step with a built-in feature map (fp16/bf16/fp32, ``Dk <= 512``, ``Dv <= 512``, ``Dv % 4 == 0``).
* :class:`CudaLoRA` / :func:`lora_batched_cuda`: ``lora_batched`` for decode batches (at most
  :data:`MAX_LORA_ROWS` rows, fp16/bf16, rank <= 512, no autograd).

The extension is compiled on first use (:mod:`attnkit.kernels.cuda_ext`); the build is only
attempted once every other check passed, so CPU calls never trigger it.
"""

from __future__ import annotations

import torch

from .backends import Backend
from .inputs import AttentionCall
from .patterns import Causal, Dense, SlidingWindow

__all__ = [
    "CudaDecodeBackend", "CudaLoRA", "MAX_DECODE_QUERIES", "MAX_LORA_ROWS", "HEAD_DIMS",
    "cuda_decode_attention", "linear_step_reasons", "linear_attention_step_cuda", "lora_batched_cuda",
    "extension_reason", "COMPILING_REASON",
]

#: Query tokens per sequence up to which a call counts as decoding (speculative decoding drafts
#: included); longer calls are prefill, which the Triton flash kernel does better.
MAX_DECODE_QUERIES = 16
HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
LINEAR_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LINEAR_FEATURES = {"identity": 0, "elu1": 1, "relu": 2}  # codes of attnkit_cuda.h FeatureMap
LINEAR_MAX_DIM = 512
#: Rows up to which the per-row BGMV kernels beat a grouped GEMM (decode batches).
MAX_LORA_ROWS = 256
MAX_LORA_RANK = 512


#: Why the CUDA backends step aside inside ``torch.compile``: their checks (building the extension
#: under a lock, K/V pointer alignment via ``data_ptr``) cannot be traced, and a graph break
#: would undo ``fullgraph=True``. The Triton kernels, which are traceable custom ops, take these
#: calls there; eager calls still reach the CUDA kernels.
COMPILING_REASON = (
    "inside torch.compile (the CUDA kernels' eager-only checks cannot be traced; the Triton "
    "kernels take the call)"
)


def extension_reason() -> str | None:
    """``None`` when the CUDA extension is loaded (building it on first use), else why not.
    Inside ``torch.compile`` always a reason (:data:`COMPILING_REASON`), without touching it."""
    from ..kernels import cuda_ext

    if torch.compiler.is_compiling():
        return COMPILING_REASON
    reason = cuda_ext.available()
    return None if reason is None else f"the CUDA extension is unavailable: {reason}"


def _device_reason(t: torch.Tensor) -> str | None:
    if t.is_cuda:
        return None
    return f"tensors are on {t.device}; the CUDA kernels need CUDA tensors"


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
    """Split-KV decode attention (``attnkit/csrc/decode_attention.cu``)."""

    name = "cuda"

    def not_supported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        q = call.q
        where = _device_reason(q)
        if where:
            reasons.append(where)
        if q.dtype not in DTYPES:
            reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16 are)")
        if call.head_dim not in HEAD_DIMS:
            dims = ", ".join(map(str, HEAD_DIMS))
            reasons.append(f"head dim {call.head_dim} is not supported ({dims} are)")
        if call.cu_seqlens_q is not None:
            reasons.append(
                "packed sequences (cu_seqlens) are not supported: the CUDA decode kernel takes a "
                "padded batch [B, H, N, D] with an optional valid_keys mask"
            )
        elif q.shape[2] > MAX_DECODE_QUERIES:
            reasons.append(
                f"{q.shape[2]} query tokens per sequence is not decoding (the CUDA kernel takes at "
                f"most {MAX_DECODE_QUERIES}; prefill goes to the Triton flash kernel)"
            )
        if call.needs_grad:
            reasons.append("the CUDA decode kernel has no backward (inference only)")
        if q.shape[0] > 65535:  # the batch is the grid's z dimension
            reasons.append(f"batch size {q.shape[0]} is above the CUDA grid limit of 65535")
        if not isinstance(call.pattern, (Dense, Causal, SlidingWindow)):
            reasons.append(
                f"pattern {call.pattern.kind!r} is not supported (Dense, Causal, SlidingWindow are)"
            )
        if not reasons and torch.compiler.is_compiling():
            reasons.append(COMPILING_REASON)  # before data_ptr(), which cannot be traced
        if not reasons:
            reasons += _kv_layout_reasons(call.k, call.v)
        if not reasons:  # only now: this may compile the extension (first use)
            ext = extension_reason()
            if ext:
                reasons.append(ext)
        return reasons

    def run(self, call: AttentionCall):
        wl, wr = call.pattern.window()
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
    from .patterns import as_pattern

    pattern = as_pattern(pattern)
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if q.shape[2] > MAX_DECODE_QUERIES:
        raise ValueError(f"q has {q.shape[2]} query tokens; at most {MAX_DECODE_QUERIES} are accepted")
    if not isinstance(pattern, (Dense, Causal, SlidingWindow)):
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
    wl, wr = pattern.window()
    return torch.ops.attnkit_cuda.decode_attention(
        q, k_cache, v_cache, cache_seqlens, None, scale, wl, wr, num_splits
    )


# --------------------------------------------------------------------------------------------
# Linear attention decode step
# --------------------------------------------------------------------------------------------


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
    if not (isinstance(feature_map, str) and feature_map in LINEAR_FEATURES):
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
        q, k, v, s.float(), z.float(), LINEAR_FEATURES[feature_map], bool(normalize), float(eps),
        float(scale),
    )


# --------------------------------------------------------------------------------------------
# Multi-adapter LoRA
# --------------------------------------------------------------------------------------------


class CudaLoRA(Backend):
    """BGMV shrink/expand (``attnkit/csrc/lora_bgmv.cu``) for ``lora_batched`` decode batches.

    Takes an ``attnkit.finetune.functional.LoRACall`` (``x [T, in]``, ``rank``, ``needs_grad``,
    ``batched``).
    """

    name = "cuda"

    def not_supported_reasons(self, call) -> list[str]:
        reasons = []
        if not call.batched:
            reasons.append("only lora_batched (multi-adapter decode) has a CUDA kernel")
        where = _device_reason(call.x)
        if where:
            reasons.append(where)
        if call.x.dtype not in DTYPES:
            reasons.append(f"dtype {call.x.dtype} is not supported (float16, bfloat16 are)")
        if call.rank > MAX_LORA_RANK:
            reasons.append(f"rank {call.rank} is above the maximum of {MAX_LORA_RANK}")
        if call.x.shape[0] > MAX_LORA_ROWS:
            reasons.append(
                f"{call.x.shape[0]} rows is not a decode batch (the CUDA kernels take at most "
                f"{MAX_LORA_ROWS}; larger batches go to the Triton grouped kernel)"
            )
        if call.needs_grad:
            reasons.append("the CUDA LoRA kernels have no backward (inference only)")
        if not reasons:
            ext = extension_reason()
            if ext:
                reasons.append(ext)
        return reasons

    def run(self, call):  # pragma: no cover - dispatch calls lora_batched_cuda directly
        raise NotImplementedError


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
