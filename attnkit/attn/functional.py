"""The functional attention API: :func:`attention`."""

from __future__ import annotations

import os

import torch

from ..kernels.dispatch import DispatchPlan, _resolve, select_backend
from ..kernels.flash.backends import BACKENDS
from ..kernels.flash.call import LaunchSlot
from .inputs import call_signature, refuse_unknown_kwargs, score_tensors, validate
from .patterns import Pattern

__all__ = ["attention"]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    valid_keys: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    max_seqlen: int | tuple[int, int] | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    **removed,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention restricted to a pattern, without an ``N x N`` matrix.

    Args:
        q: ``[B, Hq, Nq, D]`` queries. Any strides: ``x.view(B, N, H, D).transpose(1, 2)`` views
            are read in place.
        k, v: ``[B, Hkv, Nk, D]`` keys and ``[B, Hkv, Nk, Dv]`` values (``Dv`` may differ from
            ``D``, e.g. 128 against 192; both up to 256 on Triton), ``Hq % Hkv == 0`` (GQA/MQA:
            query head ``h`` reads KV head ``h // (Hq // Hkv)``, without expanding K/V in memory).
        pattern: :class:`~attnkit.Dense` (default), :class:`~attnkit.Causal`,
            :class:`~attnkit.SlidingWindow` or :class:`~attnkit.BlockSparse` (built by
            :func:`~attnkit.bigbird`, :func:`~attnkit.longformer`, :func:`~attnkit.strided`,
            :func:`~attnkit.from_mask_fn`). Positions are bottom-right aligned when
            ``Nq != Nk``: query ``i`` sits at key position ``i + Nk - Nq`` (as in flash-attention).
        scale: multiplies ``q k^T``; defaults to ``D ** -0.5``.
        valid_keys: ``[B, Nk]`` bool, True = a real key that queries may attend, False = padding
            (the sense of SDPA's bool ``attn_mask`` and transformers' ``attention_mask``). The
            pattern still works on tensor positions; padded keys are simply never attended.
            ``key_padding_mask`` is refused with an explanation: in ``torch.nn.MultiheadAttention``
            that name marks padding with True, the opposite sense.
        cu_seqlens: int32 ``[S + 1]`` cumulative lengths of ``S`` sequences packed along the N axis
            of ``B = 1`` tensors (flash-attention's varlen layout), or a pair
            ``(cu_seqlens_q, cu_seqlens_k)`` when queries and keys are packed differently.
            Sequences never attend to each other; each is bottom-right aligned on its own.
        max_seqlen: the longest packed sequence (or a ``(q, k)`` pair). Computed from
            ``cu_seqlens`` when omitted, which costs one device-to-host sync: pass it under
            ``torch.compile`` or CUDA graphs.
        backend: ``"auto"`` (CUDA decode kernel for short no-grad queries when built, else
            Triton, for CUDA tensors; torch on the CPU), ``"cuda"``, ``"triton"`` or ``"torch"``.
            ``ATTNKIT_BACKEND`` overrides ``"auto"``; ``attnkit info`` lists what each can run.
        return_lse: also return the log-sum-exp of each row's scores.
        softcap: soft-capping (Gemma 2, FlashAttention's convention): scores become
            ``softcap * tanh(s / softcap)`` with ``s = scale * q.k``, before any bias.
        sinks: ``[Hq]`` learned per-head logits (gpt-oss) that join every row's softmax
            denominator but carry no value: ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``. Its
            gradient is returned. A row that sees no key gets ``o = 0`` and ``lse = sink``.
        alibi_slopes: ``[Hq]`` or ``[B, Hq]`` (ALiBi, FlashAttention's convention): adds
            ``-slope * |i + Nk - Nq - j|`` to the score of query ``i`` and key ``j``, after
            soft-capping. No gradient flows to the slopes.

    Returns:
        ``o [B, Hq, Nq, Dv]`` in ``q``'s dtype, and with ``return_lse=True`` also
        ``lse [B, Hq, Nq]`` in float32. A query that sees no key (all keys padded, or a window
        outside the sequence) gets ``o = 0`` and ``lse = -inf`` (``lse = sink`` with sinks),
        never NaN.

    Raises:
        TypeError / ValueError naming the offending argument for bad shapes, dtypes, devices,
        masks, patterns or backends.
    """
    if removed:
        refuse_unknown_kwargs("attnkit.attention", removed)
    key = None
    if (cu_seqlens is None and max_seqlen is None and not torch.compiler.is_compiling()
            and backend.__class__ is str):
        key = plan_key(q, k, v, pattern, scale, valid_keys, return_lse, softcap, sinks,
                       alibi_slopes, backend)
        if key is not None:
            try:
                plan = _PLANS.get(key)
            except (TypeError, RuntimeError):  # a frozen pattern with an unhashable field, or
                plan = key = None  # tensor fields compared on a hash collision
            if plan is not None:
                if sinks is not None or alibi_slopes is not None:
                    sinks, alibi_slopes = score_tensors(sinks, alibi_slopes)
                call = plan.call.bind(plan.fields, q, k, v, valid_keys, sinks, alibi_slopes)
                chosen = plan.dispatch.select(call) or select_backend(call, backend, BACKENDS,
                                                                     op="attention")
                o, lse = chosen.run(call)
                return (o, lse) if return_lse else o
    call = validate(q, k, v, pattern, scale, valid_keys, cu_seqlens, max_seqlen, return_lse,
                    softcap, sinks, alibi_slopes)
    chosen = select_backend(call, backend, BACKENDS, op="attention")
    if key is not None:
        plan = _CallPlan(call, backend)
        while len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))  # the oldest signature
        _PLANS[key] = plan
        call = plan.call.bind(plan.fields, q, k, v, call.valid_keys, call.sinks, call.alibi_slopes)
    o, lse = chosen.run(call)
    return (o, lse) if return_lse else o


def plan_key(q, k, v, pattern, scale, valid_keys, return_lse, softcap, sinks, alibi_slopes,
             backend: str) -> tuple | None:
    """The cache key of a call without ``cu_seqlens`` (``inputs.call_signature``, the backend
    asked for and, for ``"auto"``, ``ATTNKIT_BACKEND``), or ``None``: not cached."""
    key = call_signature(q, k, v, pattern, scale, valid_keys, return_lse, softcap, sinks,
                         alibi_slopes)
    if key is None:
        return None
    return key, backend, os.environ.get("ATTNKIT_BACKEND") if backend == "auto" else None


class _CallPlan:
    """What one call signature (``inputs.call_signature``) needs on its next calls: the validated
    call's non-tensor fields, the dispatch's choice to replay (:class:`DispatchPlan`) and the
    backend's :class:`LaunchSlot` (the flash launch plan)."""

    __slots__ = ("call", "fields", "dispatch")

    def __init__(self, call, backend: str):
        self.call = type(call)
        self.fields = {**call.fields_of(), "launch_slot": LaunchSlot()}
        self.dispatch = DispatchPlan(call, _resolve(backend, BACKENDS), BACKENDS)


#: Call signature -> :class:`_CallPlan`; the oldest goes past :data:`_MAX_PLANS` (a model has a
#: few signatures per layer shape; a sweep over lengths must not grow it without bound).
_PLANS: dict[tuple, _CallPlan] = {}
_MAX_PLANS = 256
